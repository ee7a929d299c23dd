//! The plugin system end to end: the built-ins and the in-tree external plugin in one listing,
//! every refusal path, external plugins loaded through the ABI (one written in C built here with
//! the `cc` crate, and the OpenAI judge, written in Rust with the SDK, against a local HTTP server
//! this test starts on 127.0.0.1), and the built-in judge, backbone and dataset readers.

mod common;
use common::*;
use sage::plugin::{discover, loader, CallError, Instance, Kind};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// target/<profile>: where `cargo build` puts the in-tree external plugins (tests run from deps/).
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn in_tree() -> sage::plugin::Discovery {
    let d = discover(&[build_dir()]);
    assert!(
        d.plugins.iter().any(|p| p.name == "openai" && !p.builtin),
        "the in-tree external plugin (openai) not found in {}: run `cargo build --release` (scripts/test.sh does)",
        build_dir().display()
    );
    d
}

/// Compiles a C file into a shared library with the `cc` crate's view of the C compiler.
fn build_c(src: &Path, out: &Path) {
    build_c_with(src, out, &[]);
}

/// [`build_c`] with extra compiler flags (`-D` definitions).
fn build_c_with(src: &Path, out: &Path, flags: &[String]) {
    let target = env!("SAGE_BUILD_TARGET");
    let compiler =
        cc::Build::new().cargo_metadata(false).opt_level(2).debug(false).target(target).host(target).get_compiler();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/include");
    let status = compiler
        .to_command()
        .args(["-shared", "-fPIC", "-Wall", "-Werror"])
        .args(flags)
        .arg("-I")
        .arg(&include)
        .arg(src)
        .arg("-o")
        .arg(out)
        .arg("-lm")
        .status()
        .expect("running the C compiler");
    assert!(status.success(), "compiling {}", src.display());
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn plugins_json_lists_the_builtins_and_the_in_tree_external_plugin() {
    let _ = in_tree();
    let out = sage().args(["plugins", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let have: Vec<(String, String, bool)> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let builtin = p["builtin"].as_bool().unwrap();
            // A built-in has no file; a library has one.
            assert_eq!(builtin, p["file"].is_null(), "{p}");
            (p["kind"].as_str().unwrap().to_string(), p["name"].as_str().unwrap().to_string(), builtin)
        })
        .collect();
    for (kind, name, builtin) in [
        ("backbone", "lite", true),
        ("backbone", "dino-qwen", true),
        ("judge", "rubric", true),
        ("judge", "openai", false),
        ("dataset", "adpl", true),
        ("dataset", "manta", true),
        ("dataset", "mmad", true),
        ("dataset", "mvtec", true),
        ("dataset", "elpv", true),
    ] {
        assert!(
            have.contains(&(kind.to_string(), name.to_string(), builtin)),
            "{kind} {name} (built-in: {builtin}) missing from {have:?}"
        );
    }
    let openai = v["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "openai").unwrap();
    assert!(openai["file"].as_str().unwrap().contains("libsage_plugin_openai"), "{openai}");

    // The text listing marks the built-ins.
    let out = sage().arg("plugins").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("judge") && l.contains("rubric") && l.ends_with("built-in")), "{text}");
    assert!(text.lines().any(|l| l.contains("openai") && l.contains("libsage_plugin_openai")), "{text}");
}

#[test]
fn a_library_cannot_replace_a_builtin() {
    let dir = tempfile::tempdir().unwrap();
    build_c(&repo("tests/plugins/named_rubric.c"), &dir.path().join("libnamed_rubric.so"));
    let d = discover(&[dir.path().to_path_buf()]);
    let r = d.refused.iter().find(|r| r.file.ends_with("libnamed_rubric.so")).expect("refused");
    assert!(r.reason.contains("judge `rubric` is shadowed by the built-in"), "{}", r.reason);
    let rubric = d.get(Kind::Judge, "rubric").unwrap();
    assert!(rubric.builtin && rubric.file.is_none(), "{rubric:?}");
    // And `sage plugins` says so, with the file.
    let out = sage().arg("--plugin-dir").arg(dir.path()).arg("plugins").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("libnamed_rubric.so") && text.contains("cannot replace a built-in"), "{text}");
}

#[test]
fn every_refusal_is_listed_with_its_reason_and_the_c_plugin_loads() {
    let dir = tempfile::tempdir().unwrap();
    build_c(&repo("tests/plugins/wrong_abi.c"), &dir.path().join("libwrong_abi.so"));
    build_c(&repo("tests/plugins/no_entry.c"), &dir.path().join("libno_entry.so"));
    build_c(&repo("tests/plugins/init_fails.c"), &dir.path().join("libinit_fails.so"));
    build_c(&repo("plugins/example-c/example_backbone.c"), &dir.path().join("libsage_plugin_example_c.so"));
    std::fs::write(dir.path().join("libgarbage.so"), "this is not an ELF file").unwrap();

    let out = sage().arg("--plugin-dir").arg(dir.path()).args(["plugins", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let reason = |file: &str| -> String {
        v["refused"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["file"].as_str().unwrap().ends_with(file))
            .unwrap_or_else(|| panic!("{file} not refused: {v}"))["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let r = reason("libwrong_abi.so");
    assert!(r.contains("ABI version 999") && r.contains("version 1"), "{r}");
    assert!(reason("libno_entry.so").contains("no `sage_plugin_entry` symbol"));
    let r = reason("libinit_fails.so");
    assert!(r.contains("failed to initialise") && r.contains("license file /opt/judge.lic is missing"), "{r}");
    assert!(reason("libgarbage.so").contains("not a loadable shared library"));
    let c = v["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "example-c").expect("C plugin listed");
    assert_eq!(c["kind"], "backbone");

    // The text listing names the same refusals.
    let out = sage().arg("--plugin-dir").arg(dir.path()).arg("plugins").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("refused") && text.contains("libwrong_abi.so"), "{text}");

    // Drive the C plugin through the ABI: describe, then encode a 4×4 image into a 2×2 grid.
    let p = loader::load(&dir.path().join("libsage_plugin_example_c.so")).unwrap();
    let mut inst = p.instantiate(&serde_json::json!({})).unwrap();
    assert_eq!(inst.backbone_describe().unwrap()["vision_encoder"]["family"], "colour-grid");
    let mut pixels = vec![0.0f32; 3 * 4 * 4];
    for y in 0..4 {
        for x in 0..4 {
            pixels[y * 4 + x] = if x >= 2 { 1.0 } else { 0.0 }; // red: right half
            pixels[32 + y * 4 + x] = if y >= 2 { 0.5 } else { 0.0 }; // blue: bottom half
        }
    }
    let mut patches = vec![0.0f32; 4 * 3];
    inst.backbone_encode_image(&pixels, (4, 4), &mut patches, (4, 3)).unwrap();
    assert_eq!(patches, vec![0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 0.0, 0.5]);
    let err = inst.backbone_generate("hi", &serde_json::json!({})).unwrap_err().to_string();
    assert!(err.contains("does not generate text") && err.contains("example-c"), "{err}");
    let err = inst.backbone_encode_image(&pixels, (4, 4), &mut [0.0; 3 * 3], (3, 3)).unwrap_err().to_string();
    assert!(err.contains("square"), "{err}");
}

#[test]
fn shadowed_plugins_are_refused() {
    let d = in_tree();
    let d2 = discover(&[build_dir(), build_dir()]);
    assert_eq!(d.plugins.len(), d2.plugins.len());
    assert!(d2.refused.iter().any(|r| r.reason.contains("shadowed by")));
}

#[test]
fn missing_plugin_error_lists_what_exists() {
    let d = in_tree();
    let err = d.get(Kind::Judge, "gpt5").unwrap_err().to_string();
    assert!(err.contains("no judge plugin named `gpt5`") && err.contains("rubric"), "{err}");
}

#[test]
fn lite_backbone_describes_itself_encodes_and_generates() {
    let d = in_tree();
    let mut lite = d.get(Kind::Backbone, "lite").unwrap().instantiate(&serde_json::json!({})).unwrap();
    let desc = lite.backbone_describe().unwrap();
    assert_eq!(desc["vision_encoder"]["patch_grid"], serde_json::json!([14, 14]));
    assert_eq!(desc["llm"]["config"]["hidden_size"], 576);
    assert!(desc["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    let pixels = vec![0.1f32; 3 * 224 * 224];
    let mut patches = vec![0.0f32; 196 * 152];
    lite.backbone_encode_image(&pixels, (224, 224), &mut patches, (196, 152)).unwrap();
    let norm: f32 = patches[..40].iter().map(|v| v * v).sum::<f32>();
    assert!((norm - 1.0).abs() < 1e-3, "each token part is unit length, got {norm}");
    // The backbone generates from the GGUF's quantized blocks: llama.cpp's greedy answer on the
    // same file (tests/models.rs).
    let text =
        lite.backbone_generate("What is the capital of France?", &serde_json::json!({"max_tokens": 16})).unwrap();
    assert!(text.starts_with("L'Étoile, la Marseillaise"), "{text}");
    let err = lite.backbone_generate("x", &serde_json::json!({"max_tokenz": 3})).unwrap_err().to_string();
    assert!(err.contains("max_tokenz"), "{err}");
}

#[test]
fn dino_qwen_backbone_describes_itself_and_encodes() {
    let d = in_tree();
    let mut b = d.get(Kind::Backbone, "dino-qwen").unwrap().instantiate(&serde_json::json!({})).unwrap();
    let desc = b.backbone_describe().unwrap();
    assert_eq!(desc["vision_encoder"]["family"], "dinov2-vits14");
    assert_eq!(desc["vision_encoder"]["patch_grid"], serde_json::json!([16, 16]));
    assert_eq!(desc["adapter"], serde_json::json!({"in": 384, "out": 896}));
    assert_eq!(desc["llm"]["family"], "qwen2");
    assert_eq!(desc["llm"]["config"]["rope_theta"], 1_000_000.0);
    let pixels = vec![0.1f32; 3 * 224 * 224];
    let mut patches = vec![0.0f32; 256 * 384];
    b.backbone_encode_image(&pixels, (224, 224), &mut patches, (256, 384)).unwrap();
    assert!(patches.iter().all(|v| v.is_finite()) && patches.iter().any(|v| *v != 0.0));
    let err = b.backbone_encode_image(&pixels, (224, 224), &mut [0.0; 196 * 152], (196, 152)).unwrap_err();
    assert!(err.to_string().contains("[256, 384]"), "{err}");
}

#[test]
fn rubric_judge_is_deterministic_and_rewards_the_right_answer() {
    let d = in_tree();
    let mut j = d.get(Kind::Judge, "rubric").unwrap().instantiate(&serde_json::json!({})).unwrap();
    let req = |answer: &str| {
        serde_json::json!({
            "question": "Is there any defect in the test cell compared with the reference?",
            "answer": answer,
            "reference_answer": "Yes. A crack runs diagonally across the upper left of the cell.",
            "truth": {"conclusion": "Yes", "defect_type": "crack", "location": "upper left"},
        })
    };
    let best = j.judge_score(&req("Yes, there is a crack in the upper left corner of the cell.")).unwrap();
    let vague = j.judge_score(&req("Yes, something looks off.")).unwrap();
    let wrong = j.judge_score(&req("No, the cell is normal.")).unwrap();
    assert_eq!((best["type"].as_u64(), best["location"].as_u64()), (Some(5), Some(5)), "{best}");
    assert_eq!(vague["type"], 3);
    assert_eq!((wrong["type"].as_u64(), wrong["location"].as_u64()), (Some(1), Some(1)));
    assert!(wrong["logic"].as_u64().unwrap() <= 2);
    assert!(best["logic"].as_u64() > vague["logic"].as_u64(), "{best} vs {vague}");
    assert_eq!(best, j.judge_score(&req("Yes, there is a crack in the upper left corner of the cell.")).unwrap());
    let err = j.judge_score(&serde_json::json!({"answer": "Yes"})).unwrap_err().to_string();
    assert!(err.contains("bad judge request") && err.contains("question"), "{err}");
    // A judge asked for a backbone's function: a user error naming the built-in.
    let err = j.backbone_describe().unwrap_err();
    assert!(err.downcast_ref::<sage::error::UserError>().is_some(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("judge plugin `rubric` (built-in)") && msg.contains("does not offer"), "{msg}");
}

// ---- the OpenAI-compatible judge against a scripted local server ----

enum Reply {
    /// 200 with this assistant message.
    Chat(&'static str),
    /// This HTTP status with a plain body.
    Status(u16),
    /// Wait this long before answering (longer than the client's timeout).
    Slow(Duration),
}

/// Serves one scripted reply per request on 127.0.0.1 and returns the base URL and a handle
/// yielding the requests' Authorization headers and bodies. Bounded: stops after the script.
fn serve(script: Vec<Reply>) -> (String, std::thread::JoinHandle<Vec<(String, String)>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for reply in script {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut len, mut auth) = (0usize, String::new());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if lower.starts_with("authorization:") {
                    auth = line["authorization:".len()..].trim().to_string();
                }
            }
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).unwrap();
            seen.push((auth, String::from_utf8_lossy(&body).to_string()));
            let (status, payload) = match reply {
                Reply::Chat(content) => (
                    200,
                    serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                        .to_string(),
                ),
                Reply::Status(s) => (s, "upstream trouble".to_string()),
                Reply::Slow(d) => {
                    std::thread::sleep(d);
                    (200, "{}".to_string())
                }
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                payload.len()
            );
        }
        seen
    });
    (url, h)
}

fn openai(url: &str, extra: serde_json::Value) -> Instance {
    let d = in_tree();
    let mut cfg = serde_json::json!({"base_url": url, "model": "judge-model", "api_key_env": "SAGE_TEST_JUDGE_KEY",
        "timeout_secs": 0.5, "max_retries": 2, "backoff_ms": 10});
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    d.get(Kind::Judge, "openai").unwrap().instantiate(&cfg).unwrap()
}

fn request() -> serde_json::Value {
    serde_json::json!({"question": "Is there a defect?", "answer": "Yes, a crack.",
        "reference_answer": "Yes, a crack on the left.", "truth": {"conclusion": "Yes", "defect_type": "crack"}})
}

const KEY: &str = "sk-test-0123456789-secret";

#[test]
fn openai_judge_good_malformed_slow_and_failing_servers() {
    std::env::set_var("SAGE_TEST_JUDGE_KEY", KEY);

    // Good answer, with markdown decoration; the key travels only in the header.
    let (url, h) = serve(vec![Reply::Chat("**Type**: 4\nLocation: 3/5\nlogic - 5\nrationale: fine")]);
    let s = openai(&url, serde_json::json!({})).judge_score(&request()).unwrap();
    assert_eq!((s["type"].as_u64(), s["location"].as_u64(), s["logic"].as_u64()), (Some(4), Some(3), Some(5)));
    let seen = h.join().unwrap();
    assert_eq!(seen[0].0, format!("Bearer {KEY}"));
    let body: serde_json::Value = serde_json::from_str(&seen[0].1).unwrap();
    assert_eq!(body["model"], "judge-model");
    assert!(body["messages"][1]["content"].as_str().unwrap().contains("Candidate answer: Yes, a crack."));

    // A 500, then a good answer: retried and succeeds.
    let (url, h) = serve(vec![Reply::Status(500), Reply::Chat("type: 2\nlocation: 2\nlogic: 2")]);
    let s = openai(&url, serde_json::json!({})).judge_score(&request()).unwrap();
    assert_eq!((s["type"].as_u64(), s["attempts"].as_u64()), (Some(2), Some(2)));
    h.join().unwrap();

    // Malformed and out-of-range answers on every try: a clear error after the last one.
    let (url, h) = serve(vec![
        Reply::Chat("I think it is fine."),
        Reply::Chat("type: 9\nlocation: 1\nlogic: 1"),
        Reply::Chat("nope"),
    ]);
    let err = openai(&url, serde_json::json!({})).judge_score(&request()).unwrap_err().to_string();
    assert!(err.contains("after 3 attempt(s)") && err.contains("no `type: N` line"), "{err}");
    assert!(!err.contains(KEY), "the key leaked into an error: {err}");
    let seen = h.join().unwrap();
    assert_eq!(seen.len(), 3);

    // Out of range alone.
    let (url, h) = serve(vec![Reply::Chat("type: 0\nlocation: 1\nlogic: 1")]);
    let err = openai(&url, serde_json::json!({"max_retries": 0})).judge_score(&request()).unwrap_err().to_string();
    assert!(err.contains("type score 0, outside 1-5"), "{err}");
    h.join().unwrap();

    // Slow: every try times out; the status says timeout.
    let (url, h) = serve(vec![Reply::Slow(Duration::from_millis(1500)), Reply::Slow(Duration::from_millis(1500))]);
    let err = openai(&url, serde_json::json!({"max_retries": 1})).judge_score(&request()).unwrap_err();
    let call = err.downcast_ref::<CallError>().expect("a plugin call error");
    assert_eq!(call.status, sage_plugin_sdk::ffi::SageStatus::SAGE_TIMEOUT, "{}", call.message);
    assert!(call.message.contains("after 2 attempt(s)"), "{}", call.message);
    h.join().unwrap();

    // 500s throughout.
    let (url, h) = serve(vec![Reply::Status(503), Reply::Status(500), Reply::Status(502)]);
    let err = openai(&url, serde_json::json!({})).judge_score(&request()).unwrap_err().to_string();
    assert!(err.contains("HTTP 502"), "{err}");
    h.join().unwrap();

    // 401 is not retried.
    let (url, h) = serve(vec![Reply::Status(401)]);
    let err = openai(&url, serde_json::json!({})).judge_score(&request()).unwrap_err().to_string();
    assert!(err.contains("HTTP 401") && err.contains("after 3 attempt(s)"), "{err}");
    assert_eq!(h.join().unwrap().len(), 1);
}

#[test]
fn openai_judge_config_errors_name_the_problem_not_the_key() {
    let d = in_tree();
    let p = d.get(Kind::Judge, "openai").unwrap();
    let err = p.instantiate(&serde_json::json!({"model": "m", "api_key_env": "SAGE_TEST_UNSET_VAR_42"})).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("SAGE_TEST_UNSET_VAR_42") && msg.contains("is not set") && msg.contains("openai"), "{msg}");
    let msg = p.instantiate(&serde_json::json!({"model": "m", "base_ulr": "x"})).unwrap_err().to_string();
    assert!(msg.contains("base_ulr"), "{msg}");
}

// ---- the built-in dataset plugins over the fixtures and the ELPV asset ----

fn dataset(name: &str, config: serde_json::Value) -> Instance {
    in_tree().get(Kind::Dataset, name).unwrap().instantiate(&config).unwrap()
}

#[test]
fn dataset_plugins_read_mmad_mvtec_manta_and_elpv() {
    // MMAD: one-shot reference from random_templates[0], resolved under the image root.
    let root = repo("tests/fixtures/mmad");
    let mut mmad = dataset("mmad", serde_json::json!({"image_root": root}));
    let n = mmad.dataset_open(&root.join("mmad.json")).unwrap();
    assert!(n >= 4, "{n} MMAD samples");
    let samples: Vec<serde_json::Value> = (0..n).map(|i| mmad.dataset_get(i).unwrap()).collect();
    let broken = samples.iter().find(|s| s["test_image"].as_str().unwrap().ends_with("broken_large/000.png")).unwrap();
    assert!(broken["reference_image"].as_str().unwrap().ends_with("train/good/001.png"), "{broken}");
    assert_eq!(broken["label"], "anomalous");
    assert_eq!(broken["questions"][0]["answer"], "A");
    let mut similar = dataset("mmad", serde_json::json!({"image_root": root, "reference": "similar"}));
    similar.dataset_open(&root.join("mmad.json")).unwrap();
    let any_similar = (0..n).map(|i| similar.dataset_get(i).unwrap()).find(|s| s["id"] == broken["id"]).unwrap();
    assert!(any_similar["reference_image"].as_str().unwrap().ends_with("train/good/000.png"));
    let err = mmad.dataset_get(n).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");

    // MVTec layout: every test image gets a same-category train/good reference.
    let mut mv = dataset("mvtec", serde_json::json!({"seed": 3}));
    let n = mv.dataset_open(&repo("tests/fixtures/mvtec")).unwrap();
    for i in 0..n {
        let s = mv.dataset_get(i).unwrap();
        let (t, r) = (s["test_image"].as_str().unwrap(), s["reference_image"].as_str().unwrap());
        assert!(r.contains("/train/good/"), "{r}");
        assert_eq!(s["category"].as_str().unwrap(), if t.contains("/bottle/") { "bottle" } else { "cable" });
        if s["label"] == "anomalous" {
            assert!(s["mask"].as_str().unwrap().ends_with("_mask.png"), "{s}");
        }
    }

    // MANTA, written here from the format description.
    let dir = tempfile::tempdir().unwrap();
    image::RgbImage::new(4, 4).save(dir.path().join("a.png")).unwrap();
    let manta = serde_json::json!([{"domain": "electronics", "test_image": "a.png", "pair_type": "defect identification",
        "question_answer": [{"question_en": "Is a pin bent?", "answer": true, "conclusion_en": "Yes, pin 3 is bent."}],
        "conclusion_en": "The part is defective."}]);
    std::fs::write(dir.path().join("manta.json"), manta.to_string()).unwrap();
    let mut m = dataset("manta", serde_json::json!({}));
    assert_eq!(m.dataset_open(&dir.path().join("manta.json")).unwrap(), 1);
    let s = m.dataset_get(0).unwrap();
    assert_eq!((s["category"].as_str(), s["questions"][0]["answer"].as_str()), (Some("electronics"), Some("Yes")));

    // A malformed file: the plugin's error names the file.
    std::fs::write(dir.path().join("bad.json"), "{\"not\": \"a list\"}").unwrap();
    let err = m.dataset_open(&dir.path().join("bad.json")).unwrap_err().to_string();
    assert!(err.contains("bad.json") && err.contains("manta"), "{err}");

    // ELPV from the asset: no ambiguous (1/3) cells, references are normal cells of the same type.
    let elpv_root = package_file("elpv-dataset-1.0.0.post1", "elpv_dataset/data");
    let mut e = dataset("elpv", serde_json::json!({"seed": 0}));
    let n = e.dataset_open(&elpv_root).unwrap();
    assert!(n > 2000, "{n}");
    let s = e.dataset_get(0).unwrap();
    assert_ne!(s["test_image"], s["reference_image"]);
}

#[test]
fn adpl_plugin_reads_what_data_build_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = sage()
        .args(["data", "build", "--source", "elpv", "--limit", "12", "--seed", "1", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file =
        walk(dir.path()).into_iter().find(|p| p.extension().is_some_and(|e| e == "json")).expect("an AD-PL file");
    let mut a = dataset("adpl", serde_json::json!({}));
    let n = a.dataset_open(&file).unwrap();
    assert!(n > 0);
    let s = a.dataset_get(0).unwrap();
    let q = s["questions"].as_array().unwrap();
    assert_eq!(q.len(), 5);
    assert!(q.iter().all(|q| q["ranked_answers"].as_array().unwrap().len() == 4));
    assert!(std::path::Path::new(s["test_image"].as_str().unwrap()).exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn a_library_that_crashes_or_exits_while_loading_is_refused_and_the_listing_survives() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["entry_aborts", "entry_is_data", "ctor_exits"] {
        build_c(&repo(&format!("tests/plugins/{name}.c")), &dir.path().join(format!("lib{name}.so")));
    }
    build_c(&repo("plugins/example-c/example_backbone.c"), &dir.path().join("libsage_plugin_example_c.so"));

    let out = sage().arg("--plugin-dir").arg(dir.path()).args(["plugins", "--json"]).output().unwrap();
    assert!(out.status.success(), "status {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let reason = |file: &str| -> String {
        v["refused"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["file"].as_str().unwrap().ends_with(file))
            .unwrap_or_else(|| panic!("{file} not refused: {v}"))["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let r = reason("libentry_aborts.so");
    assert!(r.contains("signal 6 (SIGABRT)"), "{r}");
    let r = reason("libentry_is_data.so");
    assert!(r.contains("signal 11 (SIGSEGV)") || r.contains("signal 7 (SIGBUS)"), "{r}");
    let r = reason("libctor_exits.so");
    assert!(r.contains("exit status 0 before reporting"), "{r}");
    // The good plugins beside them are still listed: the C one here, the in-tree external one
    // and the built-ins.
    let names: Vec<&str> = v["plugins"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for want in ["example-c", "openai", "rubric", "adpl"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }

    // A stage that only looks plugins up survives them too.
    let d = discover(&[dir.path().to_path_buf()]);
    assert!(d.get(Kind::Backbone, "example-c").is_ok());
    assert_eq!(d.refused.iter().filter(|r| r.reason.contains("probe process")).count(), 3, "{:?}", d.refused);
}

/// The C example built with an `engine` section (a tiny random-weight DINOv2 + Qwen2 in the
/// Hugging Face layout, tests/fixtures/hf): `[model] backbone = "example-c"` trains one SFE step
/// on it through the plugin's description, the checkpoint records it, `sage infer` answers with
/// it, and without the plugin's folder the name is refused.
#[test]
fn the_c_plugins_backbone_trains_one_sfe_step_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let plugin_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let weights = repo("tests/fixtures/hf");
    build_c_with(
        &repo("plugins/example-c/example_backbone.c"),
        &plugin_dir.join("libsage_plugin_example_c.so"),
        &[format!("-DSAGE_EXAMPLE_WEIGHTS=\"{}\"", weights.display())],
    );
    let data = dir.path().join("data");
    let out = sage()
        .args(["data", "build", "--source", "elpv", "--limit", "2", "--seed", "0", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg = dir.path().join("sfe.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\ntrain = \"{d}/train.json\"\nval = \"{d}/test.json\"\n[model]\nbackbone = \"example-c\"\n\
             facts = \"none\"\nk = 2\nimage_pool = 1\nfusion_dim = 16\nfusion_heads = 2\n[llm]\nfinetune = \"lora\"\n\
             lora_rank = 2\n[train]\nsteps = 1\nbatch = 1\nlr = 1e-3\nval_questions = 1\n",
            d = data.display()
        ),
    )
    .unwrap();
    let run = dir.path().join("run");
    let out = sage()
        .arg("--plugin-dir")
        .arg(&plugin_dir)
        .args(["sfe", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 1);
    assert_eq!(state["backbone"]["name"], "example-c");
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(first["loss"].as_f64().unwrap().is_finite(), "{log}");

    let out = sage()
        .arg("--plugin-dir")
        .arg(&plugin_dir)
        .args(["infer", "--json", "--max-tokens", "4", "--question", "Is there a defect?", "--checkpoint"])
        .arg(&run)
        .arg("--test")
        .arg(elpv_image("cell0002.png"))
        .arg("--reference")
        .arg(elpv_image("cell0004.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["answer"].is_string(), "{v}");

    // Without the plugin's folder the backbone is unknown, and the message lists the built-ins.
    let out = sage().args(["sfe", "--config"]).arg(&cfg).arg("--out").arg(dir.path().join("r2")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown backbone `example-c`") && err.contains("lite, dino-qwen"), "{err}");
}
