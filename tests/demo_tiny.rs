//! The standard profile's orchestration on a tiny scale: every stage `sage demo --profile
//! standard` runs (three SFE runs, three preference runs with the standard loss options and the
//! graded judge, a GRPO run, first-token evaluations with intervals and a generated subset, the two
//! unseen-kind rows, the HTML page, the map over ELPV, the table with paired differences), with
//! two or three steps and a few pairs each. Ignored by default (about ten minutes on two cores,
//! most of it the map over all 2,327 cells): `cargo test --release --test demo_tiny -- --ignored`.

use sage::demo::profile::{Profile, STANDARD};
use sage::demo::run_demo;
use sage::demo::stages::StageEnv;

#[test]
#[ignore]
fn a_tiny_standard_demo_runs_every_stage_and_writes_the_table_and_the_page() {
    let p = Profile {
        train_items: 12,
        sfe_steps: 2,
        edpo_steps: 2,
        grpo_steps: 4,
        eval_items: 6,
        generate_items: Some(1),
        max_tokens: 8,
        val_questions: 1,
        unseen_eval_items: 4,
        pref_items: 12,
        ..STANDARD
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let env = StageEnv {
        exe: assert_cmd::cargo::cargo_bin("sage"),
        threads: 2,
        plugin_dirs: vec![],
        json: false,
        gpu: false,
    };
    let o = run_demo(&p, &out, env.clone()).unwrap();
    println!("{}", o.markdown);
    assert_eq!(o.earlier_seconds, 0.0, "a new folder has no earlier invocation");
    let first_sum = sage::demo::stages::recorded_seconds(&out.join("logs"));
    assert!(first_sum > 0.0 && first_sum <= o.seconds, "{first_sum} s recorded in {} s", o.seconds);
    assert_eq!(o.rows.len(), 9, "six ablation rows, the GRPO row and two unseen-kind rows");
    for r in &o.rows {
        let i = r.intervals.as_ref().unwrap_or_else(|| panic!("{} has no intervals", r.row));
        assert!(i.metrics.contains_key(&sage::eval::intervals::Metric::Average), "{}", r.row);
        assert!(r.yes_share.is_some() && !r.pairs.is_empty(), "{}", r.row);
    }
    assert!(o.markdown.contains("### Paired differences"), "{}", o.markdown);
    assert!(o.markdown.contains("| Full, unseen poly (trained on mono) |"), "{}", o.markdown);
    assert!(o.markdown.contains("| SFE+GRPO |"), "{}", o.markdown);
    let grpo: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("runs/grpo-fused/final.json")).unwrap()).unwrap();
    assert_eq!(grpo["steps"], 4, "{grpo}");
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(page.matches("<article class=\"pair\"").count(), 6);
    // The preference runs used the standard loss options and the graded judge's scores.
    let cfg = std::fs::read_to_string(out.join("configs/edpo-fused-edpo.toml")).unwrap();
    for key in ["sft_weight = 1.0", "graded = true"] {
        assert!(cfg.contains(key), "{key} missing from\n{cfg}");
    }
    // The standard profile states the map's score in every SFE run's prompt.
    let sfe = std::fs::read_to_string(out.join("configs/sfe-fused.toml")).unwrap();
    assert!(sfe.contains("map_cue = true"), "{sfe}");
    // The same folder under the paper's prompt is refused, naming the key, not mixed into a table.
    let Err(err) = run_demo(&Profile { map_cue: false, ..p.clone() }, &out, env.clone()) else {
        panic!("a folder made with the map cue was reused without it");
    };
    assert!(format!("{err:#}").contains("+ map_cue = false"), "{err:#}");
    // A second run resumes: every stage is found finished and the table is the same.
    let before = sage::demo::stages::recorded_seconds(&out.join("logs"));
    assert!(before >= first_sum, "the refused run's data stages are recorded too");
    let again = run_demo(&p, &out, env).unwrap();
    assert_eq!(again.rows.len(), 9);
    // Its wall time adds the stages of the invocations before it to its own.
    assert_eq!(again.earlier_seconds, before);
    assert!(again.markdown.contains("which resumed the run"), "{}", again.markdown);
    assert_eq!(
        again.markdown.split("Wall time").next(),
        o.markdown.split("Wall time").next(),
        "a resumed demo rebuilds the same table"
    );
}
