//! `sage sfe`: stage-1 training (Self-Guided Fact Enhancement).

use super::training::{report_finished, with_step_ops, write_final, RunArgs};
use super::{print_json, Ctx};
use crate::sfe::config::SfeConfig;
use crate::sfe::run::{train, validate_untrained};
use crate::stage::Session;
use anyhow::Result;

pub const LONG_ABOUT: &str =
    "Fine-tunes the SAGE model on an AD-PL dataset: the best-ranked answer of every question is the \
target (cross-entropy). The adapter, the fusion attention and the LLM (LoRA or full) train; the vision encoder is \
frozen. `[model] backbone` picks the vision encoder and LLM: `lite` (default), `dino-qwen`, or a backbone plugin \
whose description names its files; the checkpoint records it with its files' sha256. Writes log.jsonl (one line per step, plus validation lines), atomic checkpoints (weights, optimizer state, \
state.json) and final.json into --out. --resume continues a run exactly where its last checkpoint left it; \
--eval-only measures the untrained model (the Baseline row). Configs: configs/sfe-lite-quick.toml (minutes on two \
CPU cores), configs/sfe-lite.toml (the full run, for a GPU). --device cuda trains on the GPU (models::sage: \
bf16 CUDA kernels and cuBLASLt, the same loss, schedule, clipping, logs and checkpoints; validation answers on the GPU \
too); --device auto and cpu train on the CPU.";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Only validate the freshly initialised model (no training, nothing written).
    #[arg(long, conflicts_with = "resume")]
    eval_only: bool,
    /// Override model.facts.
    #[arg(long, value_enum)]
    facts: Option<crate::models::sage::FactsMode>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let mut cfg: SfeConfig = crate::config::load(&a.run.config)?;
    if let Some(s) = a.run.steps {
        cfg.train.steps = s;
    }
    if let Some(f) = a.facts {
        cfg.model.facts = f;
    }
    let out = a.run.out_dir();
    if a.run.resume {
        if let Some(step) = crate::sfe::run::finished_sfe(&out, &cfg)? {
            return report_finished(ctx, "sfe", &out, step);
        }
    }
    let mut r = Session::new(cfg, &out, &ctx.plugin_dirs)?;
    if a.eval_only {
        let v = with_step_ops!(ctx, |ops| validate_untrained(&mut r, ops)?);
        if ctx.json {
            return print_json(&serde_json::json!({"mode": "eval-only", "facts": r.cfg.model.facts, "val": v}));
        }
        println!(
            "untrained model (facts = {:?}): accuracy {:.3} on {} validation questions (majority rate {:.3}, {} answers without Yes/No)",
            r.cfg.model.facts, v.accuracy, v.questions, v.majority_rate, v.unparsed
        );
        return Ok(());
    }
    let o = with_step_ops!(ctx, |ops| train(&mut r, ops, a.run.resume, ctx.quiet())?);
    let summary = serde_json::json!({
        "out": out, "facts": r.cfg.model.facts, "steps": o.steps, "final_loss": o.final_loss, "val": o.val,
        "seconds_per_step": o.step_seconds, "tokens_per_second": o.tokens_per_second,
        "trainable_parameters": r.params.num_trainable(),
    });
    write_final(&out, &summary)?;
    if ctx.json {
        return print_json(&summary);
    }
    let v = o.val.as_ref().expect("train validates at the end");
    println!(
        "sfe (facts = {:?}): {} steps, final loss {:.4}, {:.2} s/step, {:.0} target tokens/s",
        r.cfg.model.facts, o.steps, o.final_loss, o.step_seconds, o.tokens_per_second
    );
    println!(
        "validation: accuracy {:.3} on {} questions (majority rate {:.3}, {} answers without Yes/No)",
        v.accuracy, v.questions, v.majority_rate, v.unparsed
    );
    println!("checkpoint: {}", out.display());
    Ok(())
}
