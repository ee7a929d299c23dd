//! TOML run configs (`configs/*.toml`): each numeric key set to 0, −1, NaN, ±inf, huge or a
//! neighbour; keys removed, duplicated (in the raw text) or unknown; values of the wrong type.
//! Each input goes through `sage::config::load` and what the stages derive from it first
//! (fine-tuning mode, trainer settings, the LR schedule, the fusion attention's shape).

use super::mutate::{self, FuzzRng};
use super::runner::{no_setup, Target};
use rand::Rng;
use sage::edpo::config::EdpoRunConfig;
use sage::sfe::config::{SfeConfig, TrainSection};
use std::path::Path;
use toml::Value;

fn config(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs").join(name)).unwrap()
}

/// Every leaf's path (tables only; arrays are leaves).
fn leaves(t: &toml::Table, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for (k, v) in t {
        here.push(k.clone());
        match v {
            Value::Table(sub) => leaves(sub, here, out),
            _ => out.push(here.clone()),
        }
        here.pop();
    }
}

fn table_at<'a>(t: &'a mut toml::Table, path: &[String]) -> &'a mut toml::Table {
    path.iter().fold(t, |t, k| match t.get_mut(k) {
        Some(Value::Table(sub)) => sub,
        _ => unreachable!("paths come from leaves()"),
    })
}

fn nasty(rng: &mut FuzzRng, old: &Value) -> Value {
    match (rng.random_range(0..6), old) {
        (0..=2, Value::Integer(i)) => {
            let n = mutate::int_near(rng, *i as i128);
            i64::try_from(n).map(Value::Integer).unwrap_or(Value::Float(n as f64))
        }
        (0..=2, Value::Float(f)) => Value::Float(mutate::float_near(rng, *f)),
        (0..=1, _) => Value::Float(*mutate::pick(rng, mutate::INTERESTING_FLOATS)),
        (2, _) => Value::Integer(*mutate::pick(rng, &[0, -1, 1, i64::MAX, i64::MIN, 100_000_000])),
        (3, _) => Value::String(
            mutate::pick(rng, &["", "nan", "lora", "full", "edpo", "dpo", "../../etc/passwd", "none"]).to_string(),
        ),
        (4, _) => Value::Array(vec![]),
        _ => Value::Boolean(rng.random_bool(0.5)),
    }
}

/// Structure-aware mutation of a TOML document.
pub fn mutate(data: &[u8], rng: &mut FuzzRng) -> Vec<u8> {
    let Some(mut t) = std::str::from_utf8(data).ok().and_then(|s| s.parse::<toml::Table>().ok()) else {
        return mutate::bytes(rng, data, b"[train]\nsteps = 1\n");
    };
    let mut all = vec![];
    leaves(&t, &mut vec![], &mut all);
    if all.is_empty() {
        return mutate::bytes(rng, data, b"");
    }
    let path = mutate::pick(rng, &all).clone();
    let (key, parent) = path.split_last().unwrap();
    let table = table_at(&mut t, parent);
    let raw_dup = match rng.random_range(0..10) {
        0 => {
            table.remove(key);
            None
        }
        1 => {
            table.insert(format!("{key}_typo"), Value::Integer(1));
            None
        }
        2 => Some(format!("{key} = {}", nasty(rng, &table[key]))),
        _ => {
            let v = nasty(rng, &table[key]);
            table.insert(key.clone(), v);
            None
        }
    };
    let mut text = toml::to_string(&t).unwrap_or_default();
    // A key written twice: TOML forbids it, the parser must say so.
    if let Some(line) = raw_dup {
        let needle = format!("\n{key} = ");
        if let Some(at) = text.find(&needle) {
            text.insert_str(at + 1, &format!("{line}\n"));
        }
    }
    text.into_bytes()
}

/// What training derives from the `[train]` section before its first step.
fn derive_train(t: &TrainSection) {
    let tc = t.trainer_config();
    for step in [0, t.warmup_steps.saturating_sub(1), t.warmup_steps, t.steps / 2, t.steps] {
        tc.schedule.lr(step);
    }
}

fn run_sfe(p: &Path) -> anyhow::Result<()> {
    let cfg: SfeConfig = sage::config::load(p)?;
    cfg.llm.finetune()?;
    derive_train(&cfg.train);
    cfg.model.fusion_shape(3, cfg.model.k);
    Ok(())
}

fn run_edpo(p: &Path) -> anyhow::Result<()> {
    let cfg: EdpoRunConfig = sage::config::load(p)?;
    derive_train(&cfg.train);
    cfg.edpo.loss_config();
    cfg.data.scores_path();
    cfg.data.judge_key();
    Ok(())
}

fn sfe_seeds() -> Vec<Vec<u8>> {
    vec![config("sfe-lite.toml"), config("sfe-lite-quick.toml")]
}

fn edpo_seeds() -> Vec<Vec<u8>> {
    vec![config("edpo-lite-quick.toml")]
}

pub fn targets() -> Vec<Target> {
    vec![
        Target { name: "sfe_config", file_name: "sfe.toml", seeds: sfe_seeds, mutate, setup: no_setup, run: run_sfe },
        Target {
            name: "edpo_config",
            file_name: "edpo.toml",
            seeds: edpo_seeds,
            mutate,
            setup: no_setup,
            run: run_edpo,
        },
    ]
}
