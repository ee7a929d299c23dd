//! The plugins compiled into sage: the `lite` and `dino-qwen` backbones, the `rubric` judge and the dataset
//! readers. Each is written against the SDK's [`Plugin`] trait, like a library plugin, and keeps
//! a library's contract (config JSON in; descriptions, scores and samples JSON out); the host
//! calls it in process instead of through the C ABI. Being part of sage, a built-in runs on the
//! process's one thread pool ([`crate::threads`], sized by `--threads`) — as a library each
//! linked its own copy of sage, with its own pool that `--threads` did not reach — and costs no
//! file beside the binary.

pub mod backbone;
pub mod datasets;
pub mod rubric;

use super::instance::{Calls, Create, Factory, Kind, PluginInfo};
use datasets::{Adpl, DatasetPlugin, Elpv, Manta, Mmad, Mvtec};
use sage_plugin_sdk::{F32View, F32ViewMut, Plugin, PluginError, PluginResult};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// One built-in: what a library's table would say about it, and how to make an instance.
pub struct Builtin {
    pub kind: Kind,
    pub name: &'static str,
    pub description: &'static str,
    pub(crate) create: Create,
}

/// Every built-in. Names are unique per kind; a library of the same kind and name is refused
/// as shadowed (see [`super::discovery`]).
pub static BUILTINS: [Builtin; 8] = [
    Builtin {
        kind: Kind::Backbone,
        name: "lite",
        description:
            "embedded default: EfficientNet-Lite0 patch features -> adapter -> SmolLM2-135M-Instruct (generates text)",
        create: create::<backbone::Builtin<backbone::Lite>>,
    },
    Builtin {
        kind: Kind::Backbone,
        name: "dino-qwen",
        description:
            "DINOv2 ViT-S/14 block-6 patch features -> adapter -> Qwen2.5-Coder-0.5B-Instruct (generates text)",
        create: create::<backbone::Builtin<backbone::DinoQwen>>,
    },
    Builtin {
        kind: Kind::Judge,
        name: "rubric",
        description:
            "offline deterministic proxy judge (rules + MiniLM similarity); for CI and machines without an LLM endpoint",
        create: create::<rubric::Rubric>,
    },
    Builtin {
        kind: Kind::Dataset,
        name: "adpl",
        description: "SAGE's AD-PL JSON (test/reference pairs, 5 questions x 4 ranked answers)",
        create: create::<DatasetPlugin<Adpl>>,
    },
    Builtin {
        kind: Kind::Dataset,
        name: "manta",
        description: "MANTA QA JSON (yes/no questions with conclusions)",
        create: create::<DatasetPlugin<Manta>>,
    },
    Builtin {
        kind: Kind::Dataset,
        name: "mmad",
        description: "MMAD mmad.json + image root; one-shot reference from random_templates (or similar_templates)",
        create: create::<DatasetPlugin<Mmad>>,
    },
    Builtin {
        kind: Kind::Dataset,
        name: "mvtec",
        description:
            "MVTec AD folder layout (also MPDD, VisA converted): test images paired with train/good references, masks",
        create: create::<DatasetPlugin<Mvtec>>,
    },
    Builtin {
        kind: Kind::Dataset,
        name: "elpv",
        description: "ELPV labels.csv (solar cells; defect probability 0 normal, >= 2/3 anomalous)",
        create: create::<DatasetPlugin<Elpv>>,
    },
];

/// The built-ins as plugins, in [`BUILTINS`] order.
pub fn plugins() -> impl Iterator<Item = PluginInfo> {
    BUILTINS.iter().map(|b| PluginInfo {
        kind: b.kind,
        name: b.name.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        description: b.description.to_string(),
        builtin: true,
        file: None,
        factory: Factory::Builtin(b.create),
    })
}

fn create<T: Plugin + Send>(config_json: &str) -> PluginResult<Box<dyn Calls>> {
    guarded(|| T::create(config_json)).map(|p| Box::new(Native(p)) as Box<dyn Calls>)
}

/// A panic inside a built-in becomes a failed call, as it does at a library's entry points
/// (the SDK's `catch_unwind`), so callers see the same error either way.
fn guarded<R>(f: impl FnOnce() -> PluginResult<R>) -> PluginResult<R> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
        Err(PluginError::other(format!("plugin panicked: {}", msg.unwrap_or_else(|| "(no message)".into()))))
    })
}

/// A built-in's SDK plugin value, called directly.
struct Native<T>(T);

impl<T: Plugin + Send> Calls for Native<T> {
    fn backbone_describe(&mut self) -> PluginResult<String> {
        guarded(|| self.0.backbone_describe())
    }
    fn backbone_encode_image(&mut self, pixels: F32View, out: F32ViewMut) -> PluginResult<()> {
        guarded(|| self.0.backbone_encode_image(pixels, out))
    }
    fn backbone_generate(&mut self, prompt: &str, options_json: &str) -> PluginResult<String> {
        guarded(|| self.0.backbone_generate(prompt, options_json))
    }
    fn judge_score(&mut self, request_json: &str) -> PluginResult<String> {
        guarded(|| self.0.judge_score(request_json))
    }
    fn dataset_open(&mut self, source: &str) -> PluginResult<i64> {
        guarded(|| self.0.dataset_open(source))
    }
    fn dataset_get(&mut self, index: i64) -> PluginResult<String> {
        guarded(|| self.0.dataset_get(index))
    }
}
