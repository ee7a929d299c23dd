//! The report of `sage eval`: what was evaluated and every metric, as markdown (printed and
//! written to `--out`) and as JSON (`--json`, and beside the markdown file).

use super::adpl::AdplReport;
use super::maps::MapReport;
use super::mmad::MmadReport;
use crate::data::format::DataFormat;
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: PathBuf,
    pub format: DataFormat,
    pub items: usize,
    /// Which items, when not all of the file: `first N`, or `first A anomalous and first B
    /// normal` (`--balanced`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub questions: usize,
    pub shots: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adpl: Option<AdplReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmad: Option<MmadReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maps: Option<MapReport>,
    pub judge: Option<String>,
    pub seconds: f64,
}

impl EvalReport {
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "# sage eval\n\nModel: {}\nData: {} ({:?}, {} items{}, {} questions, {}-shot)\n\n",
            self.model,
            self.data.display(),
            self.format,
            self.items,
            self.subset.as_ref().map_or(String::new(), |s| format!(": the {s}")),
            self.questions,
            self.shots
        );
        if let Some(a) = &self.adpl {
            s.push_str(&a.to_markdown());
            if let Some(j) = &self.judge {
                s.push_str(&format!("MLE judge: {j}.\n"));
            }
        }
        if let Some(m) = &self.mmad {
            s.push_str(&m.to_markdown());
        }
        if let Some(m) = &self.maps {
            let f = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.4}"));
            s.push_str(&format!(
                "\nAnomaly map: image AUROC {} ({} images, {} anomalous); pixel AUROC {} ({} masked images).\n",
                f(m.image_auroc),
                m.images,
                m.anomalous_images,
                f(m.pixel_auroc),
                m.masked_images
            ));
        }
        s.push_str(&format!("\n{:.1} s\n", self.seconds));
        s
    }

    /// Writes the markdown to `out` and the JSON beside it (`out` with extension `json`),
    /// creating `out`'s folder.
    pub fn write(&self, out: &Path) -> Result<()> {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        crate::util::write_atomic(out, self.to_markdown().as_bytes())?;
        crate::util::write_atomic(&out.with_extension("json"), serde_json::to_string_pretty(self)?.as_bytes())?;
        Ok(())
    }
}
