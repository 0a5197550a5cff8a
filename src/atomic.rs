//! Atomic file and directory writes: everything is written under a temporary name in the
//! destination's own directory and renamed into place, so a crash or a full disk never leaves
//! a half-written file where a complete one is expected.
//!
//! Temporaries are named `.<name>.tmp-<pid>-<n>` and created with the ordinary permissions
//! (`0666`/`0777` less the process's umask), so finished files are as readable as any other.
//! Replacing a directory keeps whatever the new contents do not replace: a command rewrites the
//! files it owns and never deletes someone else's. [`clean_stale`] removes the temporaries a
//! killed process left behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `.<name>.<tag>-<pid>-<n>` beside `dest`.
fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent_dir(dest).join(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.is_dir() {
        bail!("cannot write {}: it is a directory", path.display());
    }
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let tmp = sibling(path, "tmp");
    let written = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot write {}: creating a file in {}", path.display(), dir.display()))?;
        std::io::Write::write_all(&mut f, bytes).with_context(|| format!("writing {}", path.display()))?;
        f.sync_all().with_context(|| format!("flushing {}", path.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Builds a directory atomically: `fill` writes the contents into a fresh temporary directory
/// next to `dest`, which then takes `dest`'s place. Entries of an existing `dest` that `fill`
/// did not write are carried over (hard-linked, or copied), so only the files the caller owns
/// are replaced.
pub fn write_dir(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dest.exists() && !dest.is_dir() {
        bail!("cannot write the directory {}: a file of that name exists", dest.display());
    }
    let parent = parent_dir(dest);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating directory {}", parent.display()))?;
    let tmp = sibling(dest, "tmp");
    std::fs::create_dir(&tmp)
        .with_context(|| format!("cannot write {}: creating a directory in {}", dest.display(), parent.display()))?;
    let staged = fill(&tmp).and_then(|()| ordinary_permissions(&tmp)).and_then(|()| {
        if dest.exists() {
            link_missing(dest, &tmp)
        } else {
            Ok(())
        }
    });
    if let Err(e) = staged {
        let _ = std::fs::remove_dir_all(&tmp);
        // The staging directory is gone and was never the user's: say which file of `dest`
        // could not be written (`writing run/checkpoints/step-3/model.safetensors: ...`).
        let (tmp, dest) = (tmp.display().to_string(), dest.display().to_string());
        let text = crate::error_text::render(&e).replace(&tmp, &dest);
        return Err(if text.contains(&dest) {
            anyhow::anyhow!(text)
        } else {
            anyhow::anyhow!("cannot write {dest}: {text}")
        });
    }
    if dest.exists() {
        let old = sibling(dest, "old");
        std::fs::rename(dest, &old).with_context(|| format!("moving aside {}", dest.display()))?;
        std::fs::rename(&tmp, dest).with_context(|| format!("renaming into {}", dest.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(&tmp, dest).with_context(|| format!("renaming into {}", dest.display()))?;
    }
    Ok(())
}

/// Gives the files written into the fresh directory `dir` the permissions a newly created file
/// has under the process's umask (some writers, e.g. of safetensors, create files `0600`).
fn ordinary_permissions(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // `dir` was made by `create_dir`: 0777 less the umask.
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o666;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("setting the permissions of {}", entry.path().display()))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Hard-links (or copies) into `to` every entry of `from` that `to` lacks, recursively.
fn link_missing(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            if !dst.exists() {
                std::fs::create_dir(&dst).with_context(|| format!("creating {}", dst.display()))?;
            }
            if dst.is_dir() {
                link_missing(&src, &dst)?;
            }
        } else if !dst.exists() && std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {} into {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// Cleans up after a process killed while writing into `dir`: removes `.<name>.tmp-*`
/// temporaries, and of a directory caught between the two renames of [`write_dir`] either
/// removes the old copy (the new one is in place) or puts it back (it is not). Temporaries of a
/// process that is still running are left alone.
pub fn clean_stale(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_prefix('.')) else { continue };
        let Some((dest_name, tag, pid)) = parse_temporary(name) else { continue };
        if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let dest = dir.join(dest_name);
        if tag == "old" && !dest.exists() {
            std::fs::rename(&path, &dest).with_context(|| format!("restoring {}", dest.display()))?;
        } else if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        } else {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// `(name, "tmp" | "old", pid)` of a temporary named `<name>.<tag>-<pid>-<n>`.
fn parse_temporary(s: &str) -> Option<(&str, &str, u32)> {
    for tag in ["tmp", "old"] {
        if let Some(i) = s.rfind(&format!(".{tag}-")) {
            let mut rest = s[i + tag.len() + 2..].split('-');
            let pid = rest.next()?.parse().ok()?;
            rest.next()?.parse::<u64>().ok()?;
            return Some((&s[..i], tag, pid));
        }
    }
    None
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
