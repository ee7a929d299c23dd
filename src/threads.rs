//! The process's CPU thread pool: its size is set once (`--threads`, `SAGE_THREADS`, or every
//! available core) and every parallel CPU op runs on it.

use std::sync::OnceLock;

static THREADS: OnceLock<usize> = OnceLock::new();

/// Sets the size of the global thread pool (first call wins; later calls are ignored).
/// `None` means `SAGE_THREADS` or else the number of available cores.
pub fn init_threads(requested: Option<usize>) -> usize {
    *THREADS.get_or_init(|| {
        let n = requested
            .or_else(|| std::env::var("SAGE_THREADS").ok().and_then(|s| s.parse().ok()))
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
            .max(1);
        // Another part of the process may already have built the global pool; that is fine.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        n
    })
}

pub fn threads() -> usize {
    init_threads(None)
}
