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
        // The stack is the main thread's (8 MiB), as [`on_pool`] runs a whole command on a
        // worker.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).stack_size(8 << 20).build_global();
        n
    })
}

pub fn threads() -> usize {
    init_threads(None)
}

/// Runs `f` on one of the pool's workers and waits for it.
///
/// A parallel op called from outside the pool hands its tasks to the workers and puts the
/// caller to sleep until they finish: two context switches per op, and a decode step runs a
/// few hundred ops. Called from a worker, the op splits its work with the other workers and the
/// caller takes a share itself. The CLI runs each command this way; a command's own threads
/// (if any) reach the pool the other way, which stays correct.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    threads();
    rayon::scope(|_| f())
}
