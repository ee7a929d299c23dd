//! `sage map --eval-elpv`: the training-free anomaly map's image AUROC over ELPV, defective cells
//! (defect probability ≥ 2/3) against normal ones (0), each cell scored against one normal
//! reference cell of its type (mono/poly). `sage demo` reads `cells` and `image_auroc` back.

use crate::data::elpv::{self, Cell};
use crate::image_io;
use crate::metrics::auroc;
use crate::models::anomaly_map::AnomalyMapper;
use crate::opset::{Reduce, StepOps};
use crate::user_err;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The report; fields in alphabetical order, the order `--json` has always printed its keys in.
#[derive(Clone, Debug, Serialize)]
pub struct ElpvReport {
    pub cells: usize,
    pub dataset: &'static str,
    pub image_auroc: f64,
    pub negative: &'static str,
    pub per_kind: Vec<KindReport>,
    pub positive: &'static str,
    pub reduce: Reduce,
    pub seconds: f64,
}

/// One cell type (fields in alphabetical order, as above).
#[derive(Clone, Debug, Serialize)]
pub struct KindReport {
    pub auroc: Option<f64>,
    pub defective: usize,
    pub kind: String,
    pub normal: usize,
    pub reference: PathBuf,
}

/// Scores the ELPV cells under `elpv_dir`, at most `limit` of each label and type (0 = all).
pub fn elpv_auroc<O: StepOps>(
    mapper: &AnomalyMapper<O>,
    elpv_dir: &Path,
    limit: usize,
    quiet: bool,
) -> Result<ElpvReport> {
    let cells = elpv::load(elpv_dir)?;
    let mut by_kind: BTreeMap<String, (Vec<&Cell>, Vec<&Cell>)> = BTreeMap::new();
    for c in &cells {
        let e = by_kind.entry(c.kind.clone()).or_default();
        if c.is_normal() {
            e.0.push(c);
        } else if c.is_defective() {
            e.1.push(c);
        }
    }
    let cap = |v: &[&Cell]| if limit == 0 { v.len() } else { v.len().min(limit) };
    let total: usize = by_kind.values().map(|(n, d)| cap(n).saturating_sub(1) + cap(d)).sum();
    let pb = crate::util::progress_bar(total as u64, "elpv", quiet);
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    let mut per_kind = Vec::new();
    let t0 = std::time::Instant::now();
    for (kind, (normals, defects)) in &by_kind {
        // The reference is the first normal cell of this type in file order: deterministic and
        // not cherry-picked. It is not scored itself.
        let reference =
            normals.first().ok_or_else(|| user_err!("ELPV has no normal {kind} cell to use as reference"))?;
        let ref_tokens = mapper.tokens(&image_io::load(&reference.path)?)?;
        let (mut ks, mut kl) = (Vec::new(), Vec::new());
        for (c, is_defect) in
            normals[1..cap(normals)].iter().map(|c| (c, false)).chain(defects[..cap(defects)].iter().map(|c| (c, true)))
        {
            let m = mapper.compare(&mapper.tokens(&image_io::load(&c.path)?)?, Some(&ref_tokens))?;
            ks.push(m.score);
            kl.push(is_defect);
            pb.inc(1);
        }
        per_kind.push(KindReport {
            auroc: auroc(&ks, &kl),
            defective: kl.iter().filter(|l| **l).count(),
            kind: kind.clone(),
            normal: kl.iter().filter(|l| !**l).count(),
            reference: reference.path.clone(),
        });
        scores.extend(ks);
        labels.extend(kl);
    }
    pb.finish_and_clear();
    let image_auroc =
        auroc(&scores, &labels).ok_or_else(|| user_err!("ELPV evaluation needs both normal and defective cells"))?;
    Ok(ElpvReport {
        cells: scores.len(),
        dataset: "elpv",
        image_auroc,
        negative: "defect probability 0",
        per_kind,
        positive: "defect probability >= 2/3",
        reduce: mapper.reduce,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The committed quick demo's `sage map --eval-elpv --json` output (printed before the report
    /// was a typed value) is what the typed report prints, byte for byte: same keys, same order.
    #[test]
    fn the_json_is_the_committed_map_output() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/results/demo-quick/logs/map-elpv.txt");
        let text = std::fs::read_to_string(path).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let per_kind = v["per_kind"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| KindReport {
                auroc: k["auroc"].as_f64(),
                defective: k["defective"].as_u64().unwrap() as usize,
                kind: k["kind"].as_str().unwrap().into(),
                normal: k["normal"].as_u64().unwrap() as usize,
                reference: k["reference"].as_str().unwrap().into(),
            })
            .collect();
        let r = ElpvReport {
            cells: v["cells"].as_u64().unwrap() as usize,
            dataset: "elpv",
            image_auroc: v["image_auroc"].as_f64().unwrap(),
            negative: "defect probability 0",
            per_kind,
            positive: "defect probability >= 2/3",
            reduce: Reduce::Nearest,
            seconds: v["seconds"].as_f64().unwrap(),
        };
        assert_eq!(serde_json::to_string_pretty(&r).unwrap() + "\n", text);
    }
}
