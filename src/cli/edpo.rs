//! `sage edpo`: stage-2 training (Entropy-aware DPO) from an SFE run.

use super::training::{report_finished, with_step_ops, write_final, RunArgs};
use super::{print_json, Ctx};
use crate::edpo::config::{EdpoRunConfig, LossKind};
use crate::edpo::pairs::PairChoice;
use crate::edpo::run::train;
use anyhow::Result;
use std::path::PathBuf;

pub const LONG_ABOUT: &str =
    "Aligns an SFE model with Entropy-aware DPO. Every AD-PL question with ranked answers is an \
instance; the judge's scores of its answers (from `sage score`, read from data.scores) give each answer an entropy \
H (of the softmax over its type, location and logic scores). Two pairs per instance (best vs worst; the adjacent \
pair with the smallest entropy gap) are scored by the policy and by the frozen SFE model (the reference): margin \
d = beta*[(log pi(w) - log ref(w)) - (log pi(l) - log ref(l))] - eta*|H(w) - H(l)|, loss -log sigmoid(d). \
`--loss dpo` (eta = 0) is the plain-DPO ablation. The fusion attention is frozen; the adapter, the projection and the \
LLM train. Writes log.jsonl, atomic checkpoints and final.json into --out, like `sage sfe`; --resume continues \
exactly. The checkpoint is read by `sage infer` and `sage eval`. Configs: configs/edpo-lite-quick.toml. \
--device cuda trains on the GPU (policy and frozen reference on the device, the fused log-probability kernels; \
validation answers on the GPU too); --device auto and cpu train on the CPU.";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Override `sfe` (the stage-1 run folder to start from and to use as the reference).
    #[arg(long)]
    sfe: Option<PathBuf>,
    /// Override edpo.loss.
    #[arg(long, value_enum)]
    loss: Option<LossKind>,
    /// Override edpo.pairs.
    #[arg(long, value_enum)]
    pairs: Option<PairChoice>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let mut cfg: EdpoRunConfig = crate::config::load(&a.run.config)?;
    if let Some(s) = a.sfe {
        cfg.sfe = s;
    }
    if let Some(l) = a.loss {
        cfg.edpo.loss = l;
    }
    if let Some(p) = a.pairs {
        cfg.edpo.pairs = p;
    }
    if let Some(s) = a.run.steps {
        cfg.train.steps = s;
    }
    let out = a.run.out_dir();
    if a.run.resume {
        if let Some(step) = crate::edpo::run::finished_edpo(&out, &cfg)? {
            return report_finished(ctx, "edpo", &out, step);
        }
    }
    let mut r = crate::edpo::run::EdpoRun::new(cfg, &out, &ctx.plugin_dirs)?;
    let o = with_step_ops!(ctx, |ops| train(&mut r, ops, a.run.resume, ctx.quiet())?);
    let summary = serde_json::json!({
        "out": out, "sfe": r.cfg.sfe, "loss": r.cfg.edpo.loss, "beta": r.cfg.edpo.beta,
        "eta": r.cfg.edpo.loss_config().eta, "pairs": r.cfg.edpo.pairs, "instances": r.instances.len(),
        "steps": o.steps, "final_loss": o.final_loss, "val": o.val, "seconds_per_step": o.step_seconds,
        "trainable_parameters": r.session.params.num_trainable(),
    });
    write_final(&out, &summary)?;
    if ctx.json {
        return print_json(&summary);
    }
    let v = o.val.as_ref().expect("train validates at the end");
    println!(
        "{} from {}: {} steps over {} instances, final loss {:.4}, {:.2} s/step",
        match r.cfg.edpo.loss {
            LossKind::Edpo => "E-DPO",
            LossKind::Dpo => "DPO",
        },
        r.cfg.sfe.display(),
        o.steps,
        r.instances.len(),
        o.final_loss,
        o.step_seconds
    );
    println!(
        "validation: accuracy {:.3} on {} questions (majority rate {:.3}, {} answers without Yes/No)",
        v.accuracy, v.questions, v.majority_rate, v.unparsed
    );
    println!("checkpoint: {}", out.display());
    Ok(())
}
