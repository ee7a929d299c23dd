//! One writer per cache and run folder. Two `sage score` runs appending to the same score file
//! each score (and write) nearly every record, and two trainings in one run folder overwrite each
//! other's checkpoints; an advisory lock, held for as long as the writer lives, makes the second
//! process refuse at once instead.
//!
//! The lock is the operating system's (`File::try_lock`: `flock` on Unix), so it goes away with
//! its process, however that ends: a killed run never leaves a stale lock behind. The lock file
//! holds the holder's PID only so the refusal can name it. The file is left in place on release:
//! deleting it would let a third process lock a new file while a second still waits on the old.

use crate::user_err;
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file name inside a locked folder.
pub const DIR_LOCK: &str = ".sage.lock";

/// A held writer lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
    path: PathBuf,
}

impl WriterLock {
    /// Locks folder `dir` (created if needed) through `dir/.sage.lock`.
    pub fn for_dir(dir: &Path) -> Result<WriterLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        WriterLock::acquire(&dir.join(DIR_LOCK), dir)
    }

    /// Locks the single file `file` through `<file>.lock` beside it (its folder created if needed).
    pub fn for_file(file: &Path) -> Result<WriterLock> {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut name = file.as_os_str().to_owned();
        name.push(".lock");
        WriterLock::acquire(Path::new(&name), file)
    }

    /// Takes the lock in `lock_path` for `guarded` (what messages name), without waiting.
    fn acquire(lock_path: &Path, guarded: &Path) -> Result<WriterLock> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path)
            .with_context(|| format!("opening the lock file {}", lock_path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let pid = match holder.trim() {
                    "" => "unknown PID".to_string(),
                    p => format!("PID {p}"),
                };
                return Err(user_err!(
                    "{} is in use by another sage process ({pid}, lock file {}); two writers would duplicate or \
                     overwrite each other's records. Wait for that process to finish (or stop it), or use another \
                     output path",
                    guarded.display(),
                    lock_path.display()
                ));
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", lock_path.display()));
            }
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id()).with_context(|| format!("writing {}", lock_path.display()))?;
        Ok(WriterLock { _file: file, path: lock_path.to_path_buf() })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid_until_the_first_drops() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = WriterLock::for_dir(&run).unwrap();
        assert_eq!(std::fs::read_to_string(first.path()).unwrap().trim(), std::process::id().to_string());
        // flock locks are per open file, so a second open in this process conflicts like another
        // process would.
        let err = format!("{:#}", WriterLock::for_dir(&run).unwrap_err());
        assert!(err.contains(&format!("PID {}", std::process::id())) && err.contains(".sage.lock"), "{err}");
        drop(first);
        WriterLock::for_dir(&run).unwrap();

        let cache = dir.path().join("c/scores.jsonl");
        let held = WriterLock::for_file(&cache).unwrap();
        assert_eq!(held.path(), dir.path().join("c/scores.jsonl.lock"));
        assert!(crate::error::is_user_error(&WriterLock::for_file(&cache).unwrap_err()));
        WriterLock::for_file(&dir.path().join("c/other.jsonl")).unwrap();
    }
}
