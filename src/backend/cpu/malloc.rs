//! The C allocator's settings for the CPU op set's allocation pattern.
//!
//! `HostOps` returns every activation, temporary and gradient as a new `Vec<f32>`, and a training
//! step frees them all again: for SmolLM2-135M at 128 tokens that is ~170 MB of buffers between
//! 0.3 and 4 MB each, every step. With glibc's defaults the freed memory goes back to the kernel
//! (buffers above the adaptive mmap threshold are unmapped; the heap's free top is trimmed), so
//! the next step page-faults all of it in again — ~43,000 faults and the TLB shootdowns of the
//! unmaps per step, a tenth of the step's time on a two-core machine. Keeping buffers up to 32 MB
//! on the heap and never trimming it makes the second step onward reuse the first step's memory
//! (zero page faults per step, measured with `perf stat -e page-faults`). The price is that a
//! process keeps its peak heap until it exits, which is what a training or evaluation run wants.

/// glibc caps the mmap threshold at half its heap size (32 MiB on 64-bit); larger buffers (a
/// vocabulary-sized table) are always mapped, so the models keep those alive across steps
/// instead (`Llama`'s gradient pool).
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Sets the allocator up once per process, unless `GLIBC_TUNABLES` already sets glibc's malloc
/// tunables (an explicit choice, e.g. a benchmark's, wins).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            return;
        }
        // SAFETY: mallopt only changes glibc's malloc parameters; it is called before the
        // worker threads allocate and glibc serialises it with the arenas' locks anyway.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
