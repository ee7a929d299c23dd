//! `--threads` reaches the built-in plugins: they run on the process's one rayon pool, the one
//! `--threads N` sizes (`sage::threads::init_threads`, which the CLI calls with the flag). When
//! they were libraries, each linked its own copy of sage and rayon and so started its own pool,
//! of every core, on its first parallel op. This test is its own binary because the global pool
//! is set once per process and because it counts the process's OS threads.

use sage::plugin::{discover, Instance, Kind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn os_threads() -> usize {
    std::fs::read_dir("/proc/self/task").expect("Linux /proc").count()
}

/// The most OS threads this process had while `work` ran, sampled every millisecond by a thread
/// that exists before and after (so a pool that lives only during one call is seen too), and
/// the count just before.
fn threads_during(work: impl FnOnce()) -> (usize, usize) {
    let (running, peak) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicUsize::new(0)));
    let sampler = {
        let (running, peak) = (running.clone(), peak.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                peak.fetch_max(os_threads(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    let before = os_threads();
    peak.store(before, Ordering::Relaxed);
    work();
    peak.fetch_max(os_threads(), Ordering::Relaxed);
    running.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    (before, peak.load(Ordering::Relaxed))
}

fn builtin(d: &sage::plugin::Discovery, kind: Kind, name: &str) -> Instance {
    let p = d.get(kind, name).unwrap();
    assert!(p.builtin, "{p:?}");
    p.instantiate(&serde_json::json!({})).unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn threads_1_holds_inside_the_builtin_backbone_and_judge() {
    assert_eq!(sage::threads::init_threads(Some(1)), 1);
    assert_eq!(rayon::current_num_threads(), 1);
    // Discovery probes the libraries beside the binary in child processes (with reader threads
    // of their own): done before counting.
    let d = discover(&[]);
    let mut lite = builtin(&d, Kind::Backbone, "lite");
    let mut rubric = builtin(&d, Kind::Judge, "rubric");

    // Parallel CPU work in each: EfficientNet's convolutions, the LLM's matmuls, MiniLM's.
    let (before, peak) = threads_during(|| {
        let pixels = vec![0.1f32; 3 * 224 * 224];
        let mut patches = vec![0.0f32; 196 * 152];
        lite.backbone_encode_image(&pixels, (224, 224), &mut patches, (196, 152)).unwrap();
        let text = lite.backbone_generate("Say hello.", &serde_json::json!({"max_tokens": 4})).unwrap();
        assert!(!text.is_empty());
        let s = rubric
            .judge_score(&serde_json::json!({
                "question": "Is there any defect?", "answer": "Yes, a crack.",
                "reference_answer": "Yes, a crack on the left.", "truth": {"conclusion": "Yes"},
            }))
            .unwrap();
        assert!(s["type"].is_u64(), "{s}");
    });
    assert_eq!(rayon::current_num_threads(), 1);
    assert_eq!(
        peak,
        before,
        "the built-ins started {} thread(s) of their own (a second pool?) under --threads 1",
        peak.saturating_sub(before)
    );
}
