//! Depthwise convolution on the GPU (`kernels/dwconv.cu`), forward (bias and optional fused
//! ReLU6) and backward (input, weight and bias gradients; the ReLU6 mask). CPU references:
//! `ops::conv::{depthwise_conv2d, depthwise_conv2d_backward}` and `ops::relu6_`.

use super::kernels::DWCONV;
use super::{blocks, cfg, int, Gpu};
use crate::opset::DwShape;
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// `N, C, H, W, k, stride, pad_t, pad_l, Ho, Wo` as kernel arguments.
fn args(s: &DwShape) -> Result<[i32; 10]> {
    let (ho, wo) = s.out_hw();
    Ok([
        int("N", s.n)?,
        int("C", s.c)?,
        int("H", s.h)?,
        int("W", s.w)?,
        int("k", s.k)?,
        int("stride", s.stride)?,
        int("pad_top", s.pad.top)?,
        int("pad_left", s.pad.left)?,
        int("Ho", ho)?,
        int("Wo", wo)?,
    ])
}

/// `y [N, C, Ho, Wo] = act(dwconv(x, w) + bias)`, `act` ReLU6 when `relu6`.
pub fn forward(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    bias: &CudaSlice<f32>,
    s: DwShape,
    relu6: bool,
) -> Result<CudaSlice<bf16>> {
    s.check()?;
    if x.len() < s.in_len() || w.len() < s.c * s.k * s.k || bias.len() < s.c {
        bail!("depthwise convolution: x, w or bias is smaller than {s:?} needs");
    }
    // SAFETY: a thread per output element writes it.
    let y = unsafe { gpu.uninit::<bf16>(s.out_len())? };
    let f = gpu.function(&DWCONV, "dwconv_fwd")?;
    let a = args(&s)?;
    let act = i32::from(relu6);
    // SAFETY: argument order and types as in kernels/dwconv.cu; sizes checked above.
    unsafe {
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(x).arg(w).arg(bias);
        for v in &a {
            b.arg(v);
        }
        b.arg(&act).arg(&y).launch(cfg((blocks(s.out_len(), 256)?, 1, 1), 256, 0))?;
    }
    Ok(y)
}

/// The fused ReLU6's backward: `dy ← dy·[0 < y < 6]` in place.
pub fn relu6_backward(gpu: &Gpu, dy: &mut CudaSlice<bf16>, y: &CudaSlice<bf16>) -> Result<()> {
    if dy.len() != y.len() {
        bail!("relu6 backward: dy has {} elements, y {}", dy.len(), y.len());
    }
    let f = gpu.function(&DWCONV, "relu6_bwd")?;
    let n = dy.len() as i64;
    // SAFETY: as in `forward`.
    unsafe {
        gpu.stream().launch_builder(&f).arg(&*dy).arg(y).arg(&n).launch(cfg((blocks(dy.len(), 256)?, 1, 1), 256, 0))?;
    }
    Ok(())
}

/// The gradients from `dy [N, C, Ho, Wo]` (already through the activation's backward):
/// `(dx [N, C, H, W] bf16, dw [C, k, k] fp32, db [C] fp32)`.
pub fn backward(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    dy: &CudaSlice<bf16>,
    s: DwShape,
) -> Result<(CudaSlice<bf16>, CudaSlice<f32>, CudaSlice<f32>)> {
    s.check()?;
    if x.len() < s.in_len() || w.len() < s.c * s.k * s.k || dy.len() < s.out_len() {
        bail!("depthwise convolution backward: x, w or dy is smaller than {s:?} needs");
    }
    // SAFETY: a thread per input element writes dx; a block per (tap, channel) writes dw / db.
    let (dx, dw, db) =
        unsafe { (gpu.uninit::<bf16>(s.in_len())?, gpu.uninit::<f32>(s.c * s.k * s.k)?, gpu.uninit::<f32>(s.c)?) };
    let a = args(&s)?;
    let f = gpu.function(&DWCONV, "dwconv_bwd_dx")?;
    // SAFETY: as in `forward`.
    unsafe {
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(dy).arg(w);
        for v in &a {
            b.arg(v);
        }
        b.arg(&dx).launch(cfg((blocks(s.in_len(), 256)?, 1, 1), 256, 0))?;
    }
    let f = gpu.function(&DWCONV, "dwconv_bwd_dw")?;
    let taps = u32::try_from(s.k * s.k + 1)?;
    let channels = u32::try_from(s.c)?;
    if channels > 65535 {
        bail!("depthwise convolution backward: {} channels exceed the grid's 65535", s.c);
    }
    // SAFETY: as in `forward`; block 256 (the kernel's shared tree is 256 wide).
    unsafe {
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(x).arg(dy);
        for v in &a {
            b.arg(v);
        }
        b.arg(&dw).arg(&db).launch(cfg((taps, channels, 1), 256, 0))?;
    }
    Ok((dx, dw, db))
}

/// The dense convolutions' epilogue in place on a channel-major GEMM output `y [C, P]`:
/// `y = act(y + bias[c] (+ residual))`, `act` ReLU6 when `relu6`.
pub fn channel_bias_act(
    gpu: &Gpu,
    y: &mut CudaSlice<bf16>,
    bias: &CudaSlice<f32>,
    channels: usize,
    residual: Option<&CudaSlice<bf16>>,
    relu6: bool,
) -> Result<()> {
    if channels == 0
        || bias.len() < channels
        || !y.len().is_multiple_of(channels)
        || residual.is_some_and(|r| r.len() < y.len())
    {
        bail!("channel epilogue: y has {} elements for {channels} channels (bias {})", y.len(), bias.len());
    }
    let f = gpu.function(&DWCONV, "channel_bias_act")?;
    let (c, p) = (int("C", channels)?, int("P", y.len() / channels)?);
    let (has_res, act) = (i32::from(residual.is_some()), i32::from(relu6));
    // Without a residual the kernel never reads `res`; `y` stands in for the pointer.
    let res: &CudaSlice<bf16> = residual.unwrap_or(&*y);
    // SAFETY: as in `forward`.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(&*y)
            .arg(bias)
            .arg(res)
            .arg(&c)
            .arg(&p)
            .arg(&has_res)
            .arg(&act)
            .launch(cfg((blocks(y.len(), 256)?, 1, 1), 256, 0))?;
    }
    Ok(())
}
