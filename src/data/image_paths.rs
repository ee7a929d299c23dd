//! Where a dataset's image paths may point. A data file is input from someone else: a path such
//! as `/etc/passwd` or `../../etc/passwd` must not make a stage read (and maybe quote back) a
//! file outside the folders the user pointed sage at. A path is allowed when, with symlinks
//! resolved, it lies inside the image root (`--image-root`, default: the data file's folder) or
//! inside `$SAGE_HOME`, where `sage fetch` puts the datasets `sage data build` reads (its files
//! hold absolute paths into it). `--allow-outside-root` lifts the rule.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Process-wide `--allow-outside-root`: a trust decision of the person running sage, set once
/// from the command line, so every stage that reads a dataset honours it without threading a flag
/// through each stage's config.
static ALLOW_OUTSIDE_ROOT: AtomicBool = AtomicBool::new(false);

pub fn set_allow_outside_root(allow: bool) {
    ALLOW_OUTSIDE_ROOT.store(allow, Ordering::Relaxed);
}

pub fn allow_outside_root() -> bool {
    ALLOW_OUTSIDE_ROOT.load(Ordering::Relaxed)
}

/// The folders image paths must resolve into.
#[derive(Clone, Debug)]
pub struct Roots {
    /// The image root as given (messages name it so).
    pub image_root: PathBuf,
    /// Resolved forms of the image root and `$SAGE_HOME`.
    resolved: Vec<PathBuf>,
    pub allow_outside: bool,
}

impl Roots {
    pub fn new(image_root: &Path, allow_outside: bool) -> Roots {
        let resolved = vec![real_path(image_root), real_path(&crate::assets::sage_home())];
        Roots { image_root: image_root.to_path_buf(), resolved, allow_outside }
    }

    /// Why `p` may not be read, or `None` when it may.
    pub fn refusal(&self, p: &Path) -> Option<String> {
        if self.allow_outside {
            return None;
        }
        let real = real_path(p);
        if self.resolved.iter().any(|r| real.starts_with(r)) {
            return None;
        }
        let via = if real == p { String::new() } else { format!(" (it resolves to {})", real.display()) };
        Some(format!(
            "{} lies outside the image root {}{via}; move the image under the root, point --image-root at a \
             folder that holds it, or pass --allow-outside-root if you trust this file",
            p.display(),
            self.image_root.display()
        ))
    }
}

/// `p` made absolute with every symlink resolved: the longest prefix that exists is
/// canonicalised, and the rest (which does not exist, so holds no symlink) is applied lexically.
pub fn real_path(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let parts: Vec<Component> = abs.components().collect();
    for n in (1..=parts.len()).rev() {
        let prefix: PathBuf = parts[..n].iter().collect();
        if let Ok(mut real) = std::fs::canonicalize(&prefix) {
            for c in &parts[n..] {
                match c {
                    Component::ParentDir => {
                        real.pop();
                    }
                    Component::Normal(s) => real.push(s),
                    _ => {}
                }
            }
            return real;
        }
    }
    abs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_outside_dotdot_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/x.png"), b"x").unwrap();
        let roots = Roots::new(&root, false);
        assert_eq!(roots.refusal(&root.join("a/x.png")), None);
        assert_eq!(roots.refusal(&root.join("a/missing/../y.png")), None, "missing files are judged by path");
        assert!(roots.refusal(Path::new("/etc/passwd")).is_some());
        let up = roots.refusal(&root.join("a/../../../etc/passwd")).unwrap();
        assert!(up.contains("resolves to") && up.contains("--allow-outside-root"), "{up}");
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        assert!(roots.refusal(&root.join("link/passwd")).is_some(), "a symlink out of the root");
        assert!(roots.refusal(&root.join("link/nothing/x.png")).is_some());
        assert_eq!(Roots::new(&root, true).refusal(Path::new("/etc/passwd")), None);
    }
}
