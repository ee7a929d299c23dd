//! Compute backends. The CPU backend is always present and runs every op; the CUDA backend
//! ([`cuda`]) runs the SAGE kernels and cuBLASLt GEMMs when a device works, and [`select`] decides
//! what a run uses and says why.

pub mod cpu;
pub mod cuda;
pub mod nvrtc;

use serde::Serialize;

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

/// The backend a run will use, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Selection {
    pub backend: &'static str,
    pub reason: String,
}

/// Picks the backend for the model ops. The CUDA backend ([`cuda`]) runs the SAGE kernels and
/// GEMMs (`sage bench kernels`, the parity tests), the LLaMA training step (`sage bench train`,
/// which decides `auto` itself) and the SAGE model's steps and generation (`models::sage`:
/// sfe, edpo, infer, eval and demo with an explicit `cuda`). Under `auto` the pipeline stays on
/// the CPU until its GPU path has run on a device; the frozen image encoder always does. An
/// explicit `cuda` is accepted only by the commands that can use it (checked in `cli::run`).
pub fn select(choice: DeviceChoice) -> anyhow::Result<Selection> {
    match choice {
        DeviceChoice::Cpu => Ok(Selection { backend: "cpu", reason: "requested with --device cpu".into() }),
        DeviceChoice::Auto => Ok(Selection { backend: "cpu", reason: format!("--device auto: {}", auto_reason()) }),
        DeviceChoice::Cuda => match cuda::probe() {
            Ok(info) => Ok(Selection {
                backend: "cuda",
                reason: format!(
                    "requested with --device cuda: {} (sm_{}, driver {})",
                    info.name, info.arch, info.driver_version
                ),
            }),
            Err(why) => Err(crate::user_err!("--device cuda: {why}; run with --device cpu (or auto)")),
        },
    }
}

/// Why `auto` resolves to the CPU. Cheap: it creates no CUDA context.
fn auto_reason() -> String {
    // SAFETY: dlopen of the driver library by name; nothing in it is called.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        "a CUDA driver is present; `sage bench` uses it under auto, and sfe, edpo, infer, eval and demo with --device cuda \
         (their GPU path has not yet run on a device, so auto keeps them on the CPU)"
            .into()
    } else {
        "no CUDA driver (libcuda.so) found on this machine".into()
    }
}

/// What the CUDA backend can do here: the device, or why there is none. Creates a context.
pub fn cuda_status() -> serde_json::Value {
    match cuda::probe() {
        Ok(info) => serde_json::json!({ "available": true, "device": info }),
        Err(why) => serde_json::json!({ "available": false, "reason": why }),
    }
}
