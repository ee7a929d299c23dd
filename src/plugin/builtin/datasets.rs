//! The built-in dataset plugins (`adpl`, `manta`, `mmad`, `mvtec`, `elpv`): each is this adapter
//! over one of the readers in [`crate::data`], registered in [`super::BUILTINS`].
//!
//! Config (JSON, every key optional): `image_root` (resolve relative image paths against this
//! folder instead of the file's), `reference` (`random` | `similar`, MMAD's template choice),
//! `seed` (reference pairing for MVTec/ELPV).

use crate::data::{self, Sample};
use anyhow::Result;
use sage_plugin_sdk::{Plugin, PluginError, PluginResult};
use serde::Deserialize;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
}

/// One dataset format: how a source path becomes samples.
pub trait SampleSource: 'static {
    fn load(cfg: &DatasetConfig, source: &Path) -> Result<Vec<Sample>>;
}

pub struct DatasetPlugin<S> {
    cfg: DatasetConfig,
    samples: Vec<Sample>,
    _format: PhantomData<S>,
}

impl<S: SampleSource> Plugin for DatasetPlugin<S> {
    fn create(config_json: &str) -> PluginResult<Self> {
        let cfg: DatasetConfig = serde_json::from_str(config_json).map_err(|e| {
            PluginError::invalid(format!("bad dataset config: {e} (keys: image_root, reference, seed)"))
        })?;
        if let Some(r) = &cfg.reference {
            if r != "random" && r != "similar" {
                return Err(PluginError::invalid(format!("reference must be `random` or `similar`, got `{r}`")));
            }
        }
        Ok(DatasetPlugin { cfg, samples: Vec::new(), _format: PhantomData })
    }

    fn dataset_open(&mut self, source: &str) -> PluginResult<i64> {
        self.samples = S::load(&self.cfg, Path::new(source)).map_err(|e| PluginError::io(format!("{e:#}")))?;
        Ok(self.samples.len() as i64)
    }

    fn dataset_get(&mut self, index: i64) -> PluginResult<String> {
        let s = usize::try_from(index).ok().and_then(|i| self.samples.get(i)).ok_or_else(|| {
            PluginError::invalid(format!("sample index {index} is out of range 0..{}", self.samples.len()))
        })?;
        serde_json::to_string(s).map_err(|e| PluginError::other(e.to_string()))
    }
}

pub struct Adpl;
impl SampleSource for Adpl {
    fn load(cfg: &DatasetConfig, source: &Path) -> Result<Vec<Sample>> {
        data::adpl::load(source, cfg.image_root.as_deref())
    }
}

pub struct Manta;
impl SampleSource for Manta {
    fn load(cfg: &DatasetConfig, source: &Path) -> Result<Vec<Sample>> {
        data::manta::load(source, cfg.image_root.as_deref())
    }
}

pub struct Mmad;
impl SampleSource for Mmad {
    fn load(cfg: &DatasetConfig, source: &Path) -> Result<Vec<Sample>> {
        let reference = match cfg.reference.as_deref() {
            Some("similar") => data::mmad::RefChoice::Similar,
            _ => data::mmad::RefChoice::Random,
        };
        data::mmad::load(source, cfg.image_root.as_deref(), reference)
    }
}

pub struct Mvtec;
impl SampleSource for Mvtec {
    fn load(cfg: &DatasetConfig, source: &Path) -> Result<Vec<Sample>> {
        data::mvtec::load(source, cfg.seed.unwrap_or(0))
    }
}

pub struct Elpv;
impl SampleSource for Elpv {
    fn load(cfg: &DatasetConfig, source: &Path) -> Result<Vec<Sample>> {
        data::elpv::samples(&data::elpv::load(source)?, cfg.seed.unwrap_or(0))
    }
}
