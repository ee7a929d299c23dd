//! `sage grpo`: GRPO with multi-stage answers and fine-grained rewards, from an SFE run.

use super::training::{report_finished, with_step_ops, write_final, RunArgs};
use super::{print_json, Ctx};
use crate::grpo::config::{GrpoRunConfig, UniformGroups};
use crate::grpo::run::{finished_grpo, train, GrpoRun};
use anyhow::Result;
use std::path::PathBuf;

pub const LONG_ABOUT: &str = "Trains an SFE model with GRPO (group relative policy optimisation) on AD-FM's \
multi-stage answers. Each training image pair is asked to answer in three stages, <think> (candidate regions as \
[x1, y1, x2, y2] boxes in the test image's pixels) then <rethink> (a closer look) then <answer> (normal, or \
anomalous with the defect's type and box). The policy samples grpo.group answers per pair (grpo.temperature, \
grpo.top_p, batched KV-cached decode); each answer is parsed leniently and rewarded: format (the stages present \
and in order), classification (1 for the right verdict and type, grpo.reward.partial_type for the right verdict \
with another type) and localisation (answer boxes matched to the sample's mask boxes by the Hungarian algorithm, \
mean GIoU plus a box-count term), their weighted mean the reward; by default the verdict and boxes count only from a complete <answer> stage (grpo.reward.answer_only) and an answer near or at grpo.max_new loses up to grpo.reward.overlong_penalty (DAPO's soft overlong punishment), so rambling to the token cap does not pay. Advantages are rewards relative to their group \
(minus the mean, over the std); a group whose answers all score the same is sampled again or skipped \
(grpo.uniform), and counted. The update is the clipped policy ratio (grpo.epsilon, per answer on its mean \
per-token log-ratio) with a k3 KL penalty (grpo.kl_beta) to the frozen model GRPO began from (the SFE model, or the \
end of the cold start), grpo.updates_per_batch \
optimizer steps per sampled batch; grpo.sft_steps cold-start steps come first, supervised on the truth written in \
the format (with the SFE model's map cue, the prompt and the <think> stage name the map's region) at the \
schedule's learning rate; the GRPO updates run at grpo.lr_scale times it (default 1). Training pairs are drawn \
in seeded epochs over the file, or with grpo.balance = true normal and anomalous in turn, so that neither label \
is drawn more often. With grpo.sfe_anchor = N, N examples of the SFE run's own task (a training question and its \
best-ranked answer) join every update (and the cold start's targets), the cross-entropy of their answers added \
to the loss with weight grpo.sfe_anchor_weight (InstructGPT's PPO-ptx; off by default: on the standard demo's \
GRPO row it made the first-token accuracy worse, docs/results/standard/grpo-row-20261206); with \
grpo.sfe_anchor_tokens = \"conclusion\" the term counts only each anchor answer's first token, the Yes/No \
conclusion that `sage eval --first-token` scores. The held-out verdict accuracy (with its 95% Wilson interval; with the map cue \
beside the map's own verdict, its score at the cue's middle level or above), mean reward and localisation reward \
(beside what the map's region scores as the box) are logged before any cold start (val_start), when GRPO begins (val_before), every \
train.val_every steps and at the end (final.json). Writes log.jsonl (reward and its parts, the share of uniform groups, KL, clip fraction per step), atomic checkpoints and final.json into --out; \
--resume continues exactly. `sage eval --checkpoint` reads the run. Config: configs/grpo-elpv-quick.toml.";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Override `sfe` (the stage-1 run folder to start from and to use as the KL reference).
    #[arg(long)]
    sfe: Option<PathBuf>,
    /// Override grpo.group (answers sampled per prompt).
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=64))]
    group: Option<u64>,
    /// Override grpo.uniform (what a group of equal rewards gets).
    #[arg(long, value_enum)]
    uniform: Option<UniformGroups>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let mut cfg: GrpoRunConfig = crate::config::load(&a.run.config)?;
    if let Some(s) = a.sfe {
        cfg.sfe = s;
    }
    if let Some(g) = a.group {
        cfg.grpo.group = g as usize;
    }
    if let Some(u) = a.uniform {
        cfg.grpo.uniform = u;
    }
    if let Some(s) = a.run.steps {
        cfg.train.steps = s;
    }
    let out = a.run.out_dir();
    if a.run.resume {
        if let Some(step) = finished_grpo(&out, &cfg)? {
            return report_finished(ctx, "grpo", &out, step);
        }
    }
    let mut r = GrpoRun::new(cfg, &out, &ctx.plugin_dirs)?;
    let o = with_step_ops!(ctx, |ops| train(&mut r, ops, a.run.resume, ctx.quiet())?);
    let summary = serde_json::json!({
        "out": out, "sfe": r.cfg.sfe, "grpo": r.cfg.grpo, "prompts": r.items.len(),
        "val_items": r.val_items.len(), "steps": o.steps, "final_loss": o.final_loss, "val": o.val,
        "seconds_per_step": o.step_seconds, "trainable_parameters": r.session.params.num_trainable(),
    });
    write_final(&out, &summary)?;
    if ctx.json {
        return print_json(&summary);
    }
    let v = o.val.as_ref().expect("train validates at the end");
    println!(
        "GRPO from {}: {} steps over {} prompts, {} answers each, {:.1} s/step",
        r.cfg.sfe.display(),
        o.steps,
        r.items.len(),
        r.cfg.grpo.group,
        o.step_seconds
    );
    println!(
        "held-out verdicts: accuracy {:.3} [{:.3}, {:.3}] on {} images (majority rate {:.3}, {} without a verdict), \
         mean reward {:.3}",
        v.accuracy,
        v.interval[0],
        v.interval[1],
        v.questions,
        v.majority_rate,
        v.unparsed,
        v.mean_reward.unwrap_or(f64::NAN)
    );
    if let Some(m) = v.map_accuracy {
        println!(
            "the map's own verdict (its score at the cue's middle level or above): accuracy {m:.3} on the same images"
        );
    }
    if let Some(loc) = v.mean_loc {
        let map = v.map_loc.map_or(String::new(), |m| format!(" (the map's region as the box: {m:.3})"));
        println!("held-out localisation reward: {loc:.3} on the images with true boxes{map}");
    }
    println!("log: {}  checkpoint: {}", out.join("log.jsonl").display(), out.display());
    Ok(())
}
