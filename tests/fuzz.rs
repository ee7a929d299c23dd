//! Fuzzing every loader on stable Rust: structure-aware mutation of real files (the assets in
//! `$SAGE_HOME`, `configs/`, `tests/fixtures`, the test images) plus byte-level damage, each
//! input run through the library's real loading + validation path in a child process with an
//! address-space limit. Outcomes per target: ok, clean error, PANIC, ABORT (signal), HANG
//! (per-input time limit), MEMORY (an allocation the limit refused). A panic, abort, hang or
//! memory blow-up saves its input under `tests/fixtures/fuzz/<target>/crash-<hash>.<ext>` (with a
//! `.txt` note of the cause) and fails the test; `fuzz_crash_files_are_refused_cleanly` replays
//! every saved input and expects a clean result.
//!
//! CI runs a bounded pass: each target at most 400 iterations or 6 s. A longer run by hand:
//!
//! ```text
//! SAGE_FUZZ_SECS=600 cargo test --release --test fuzz -- --nocapture
//! ```
//!
//! Knobs: `SAGE_FUZZ_SECS` (seconds per target; lifts the iteration cap), `SAGE_FUZZ_ITERS`,
//! `SAGE_FUZZ_SEED` (default 16; inputs are a pure function of seed, target and iteration),
//! `SAGE_FUZZ_HANG_SECS` (per-input limit, default 20), `SAGE_FUZZ_MEM_MB` (child address
//! space, default 3072). One target: `cargo test --release --test fuzz fuzz_png -- --nocapture`.

mod common;
#[path = "fuzz/mod.rs"]
mod kit;

use kit::runner::{self, Budget};

#[global_allocator]
static ALLOC: kit::alloc::NotingAlloc = kit::alloc::NotingAlloc;

/// The child process's entry point (see `kit::runner`); the parent tests start it.
#[test]
#[ignore = "entry point of the fuzz child process, started by the fuzz_* tests"]
fn fuzz_child() {
    runner::child_main(&kit::targets());
}

fn fuzz_target(name: &str) {
    let targets = kit::targets();
    let t = targets.iter().find(|t| t.name == name).unwrap();
    let b = Budget::from_env();
    let r = runner::fuzz(t, &b);
    let summary = r.summary(name, &b);
    runner::say(&summary);
    assert!(r.bad_seeds.is_empty(), "the seed corpus or harness is broken:\n{summary}");
    assert!(r.iterations > 0, "no iteration ran:\n{summary}");
    assert_eq!(r.failures(), 0, "{summary}");
}

macro_rules! fuzz_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                fuzz_target(stringify!($name).strip_prefix("fuzz_").unwrap());
            }
        )*
    };
}

fuzz_tests!(
    fuzz_gguf,
    fuzz_safetensors,
    fuzz_bert_config,
    fuzz_pth,
    fuzz_png,
    fuzz_jpeg,
    fuzz_sfe_config,
    fuzz_edpo_config,
    fuzz_adpl,
    fuzz_manta,
    fuzz_mmad
);

/// Every test has a target and every target a test.
#[test]
fn fuzz_every_target_has_a_test() {
    let names: Vec<&str> = kit::targets().iter().map(|t| t.name).collect();
    let tested = [
        "gguf",
        "safetensors",
        "bert_config",
        "pth",
        "png",
        "jpeg",
        "sfe_config",
        "edpo_config",
        "adpl",
        "manta",
        "mmad",
    ];
    assert_eq!(names, tested);
}

/// Every input the fuzzer ever saved (tests/fixtures/fuzz/<target>/crash-*), replayed alone:
/// each must load Ok or fail with a clean error.
#[test]
fn fuzz_crash_files_are_refused_cleanly() {
    let b = Budget::from_env();
    let mut bad = vec![];
    for t in &kit::targets() {
        bad.extend(runner::replay_saved(t, &b));
    }
    assert!(bad.is_empty(), "{} saved inputs still crash:\n{}", bad.len(), bad.join("\n"));
}
