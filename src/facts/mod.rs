//! Fact generation (`sage facts`, ARCHITECTURE.md §1 "Fact embedding"): short sentences of domain
//! knowledge about each test image's kind of object, written offline by a backbone that generates
//! text, cached, and read back by training (`FactSet`).
//!
//! - Prompts come from the image's category only ([`prompts`]), never from its label.
//! - Each raw generation is cleaned to its first sentence ([`clean`]); empty and duplicate
//!   sentences are dropped and recorded as such in the output line, never replaced.
//! - Every generation goes to an append-only cache beside the output ([`cache`]) as soon as it
//!   exists, keyed by (image sha256, prompt, backbone, options); identical (prompt, backbone,
//!   options) generations are reused across images. A run killed at any point is resumed by
//!   running it again; the output file is written atomically at the end, in dataset order.
//!
//! Output: JSONL, one [`ImageFacts`] per distinct test image.

pub mod cache;
pub mod clean;
pub mod prompts;

pub use crate::data::format::{guess_format, load_samples, DataFormat};
use crate::data::Sample;
use crate::plugin::{self, Instance, Kind};
use crate::user_err;
use crate::util::{progress_bar, write_atomic};
use anyhow::{Context, Result};
use cache::{Cache, Record};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The generation options sent to the backbone with every prompt (the lite backbone's
/// `backbone_generate` options). Part of the cache key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenOptions {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    #[serde(default)]
    pub system: Option<String>,
}

impl GenOptions {
    /// Rejects values no backbone can use.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(user_err!("--max-tokens must be at least 1"));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(user_err!("--temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(user_err!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// A sentence that did not make it into `facts`, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dropped {
    /// Index into `prompts`.
    pub prompt: usize,
    /// `"empty"` (no words in the generation) or `"duplicate of fact K"`.
    pub reason: String,
    /// The raw generation.
    pub raw: String,
}

/// One output line: the facts about one test image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFacts {
    pub image: PathBuf,
    pub image_sha256: String,
    pub category: Option<String>,
    /// Clean, distinct, non-empty sentences, in prompt order (fewer than the prompts when some
    /// were dropped: see `dropped`).
    pub facts: Vec<String>,
    pub prompts: Vec<String>,
    pub backbone: String,
    pub generation: GenOptions,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<Dropped>,
}

/// A facts file loaded for lookup by image.
#[derive(Clone, Debug, Default)]
pub struct FactSet {
    pub items: Vec<ImageFacts>,
    by_path: HashMap<PathBuf, usize>,
    by_sha: HashMap<String, usize>,
}

impl FactSet {
    /// Reads a `sage facts` output file; a bad line is a user error naming the line.
    pub fn load(path: &Path) -> Result<FactSet> {
        let text = std::fs::read_to_string(path).map_err(|e| user_err!("cannot read facts {}: {e}", path.display()))?;
        let mut set = FactSet::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let item: ImageFacts = serde_json::from_str(line).map_err(|e| {
                user_err!("{}:{}: not a facts line: {e} (write the file with `sage facts`)", path.display(), i + 1)
            })?;
            set.by_path.entry(item.image.clone()).or_insert(set.items.len());
            set.by_sha.entry(item.image_sha256.clone()).or_insert(set.items.len());
            set.items.push(item);
        }
        Ok(set)
    }

    /// The facts of an image, by the path the data file gave.
    pub fn get(&self, image: &Path) -> Option<&ImageFacts> {
        self.by_path.get(image).map(|&i| &self.items[i])
    }

    /// The facts of an image with this content (sha256, lower-case hex).
    pub fn get_by_sha256(&self, sha: &str) -> Option<&ImageFacts> {
        self.by_sha.get(sha).map(|&i| &self.items[i])
    }
}

/// One distinct test image and the category its prompts are built from.
#[derive(Clone, Debug, PartialEq)]
pub struct TestImage {
    pub image: PathBuf,
    pub category: Option<String>,
}

/// The distinct test images in dataset order (first appearance), at most `limit` (0 = all). The
/// category is the first one any sample of the image gives. Labels are not looked at.
pub fn test_images(samples: &[Sample], limit: usize) -> Vec<TestImage> {
    let mut seen: HashMap<&Path, usize> = HashMap::new();
    let mut out: Vec<TestImage> = Vec::new();
    for s in samples {
        match seen.get(s.test_image.as_path()) {
            Some(&i) => {
                if out[i].category.is_none() {
                    out[i].category = s.category.clone();
                }
            }
            None => {
                if limit > 0 && out.len() == limit {
                    continue;
                }
                seen.insert(&s.test_image, out.len());
                out.push(TestImage { image: s.test_image.clone(), category: s.category.clone() });
            }
        }
    }
    out
}

/// The sha256 of a file, lower-case hex; an unreadable image is a user error.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| user_err!("cannot read test image {}: {e}", path.display()))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// Something that writes text for a prompt.
pub trait Generator {
    /// The backbone's name (part of the cache key).
    fn name(&self) -> &str;
    fn generate(&mut self, prompt: &str, options: &GenOptions) -> Result<String>;
}

/// A backbone plugin that generates text.
pub struct PluginBackbone {
    name: String,
    instance: Instance,
}

impl Generator for PluginBackbone {
    fn name(&self) -> &str {
        &self.name
    }

    fn generate(&mut self, prompt: &str, options: &GenOptions) -> Result<String> {
        self.instance.backbone_generate(prompt, &serde_json::to_value(options)?)
    }
}

/// Finds backbone `name`, creates it with an empty config, and checks that its description
/// says it generates text (`"generates": true`). Unknown backbones and ones that cannot
/// generate are user errors naming the backbones found.
pub fn open_backbone(plugin_dirs: &[PathBuf], name: &str) -> Result<PluginBackbone> {
    let found = plugin::discover(plugin_dirs);
    let p = found.get(Kind::Backbone, name)?;
    let mut instance = p.instantiate(&serde_json::json!({}))?;
    let description = instance
        .backbone_describe()
        .with_context(|| format!("asking backbone `{name}` ({}) to describe itself", p.origin()))?;
    if description.get("generates") != Some(&Value::Bool(true)) {
        let others: Vec<&str> = found
            .plugins
            .iter()
            .filter(|q| q.kind == Kind::Backbone && q.name != name)
            .map(|q| q.name.as_str())
            .collect();
        return Err(user_err!(
            "backbone `{name}` ({}) cannot generate text: its description does not say `\"generates\": true`; pick a backbone that generates with --backbone (other backbones found: {})",
            p.origin(),
            if others.is_empty() { "none".to_string() } else { others.join(", ") }
        ));
    }
    Ok(PluginBackbone { name: name.to_string(), instance })
}

/// What to write.
#[derive(Clone, Debug)]
pub struct Job {
    pub data: PathBuf,
    pub format: Option<DataFormat>,
    pub image_root: Option<PathBuf>,
    pub out: PathBuf,
    /// Sentences per image, 1..=[`prompts::MAX_SENTENCES`].
    pub sentences: usize,
    /// At most this many distinct test images, in dataset order (0 = all).
    pub limit: usize,
    pub options: GenOptions,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Distinct test images, one output line each.
    pub images: usize,
    /// Backbone calls made by this run.
    pub generated: usize,
    /// Sentences taken from the cache (earlier runs, or an identical prompt earlier in this run).
    pub cached: usize,
    pub out: PathBuf,
    pub cache: PathBuf,
    /// Sentences written across all images.
    pub facts: usize,
    /// Generations dropped as empty or duplicate.
    pub dropped: usize,
    /// Cache lines found on start: complete records, a torn last line cut off, unreadable lines.
    pub cache_loaded: cache::LoadReport,
    pub seconds: f64,
}

/// The cache file of an output file: `F.jsonl` → `F.jsonl.cache`.
pub fn cache_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".cache");
    PathBuf::from(s)
}

/// Checks a job and reads its test images (before any backbone is loaded).
pub fn plan(job: &Job) -> Result<Vec<TestImage>> {
    if job.sentences == 0 || job.sentences > prompts::MAX_SENTENCES {
        return Err(user_err!("--sentences must be between 1 and {}, got {}", prompts::MAX_SENTENCES, job.sentences));
    }
    job.options.validate()?;
    let samples = load_samples(&job.data, job.format, job.image_root.as_deref())?;
    let images = test_images(&samples, job.limit);
    if images.is_empty() {
        return Err(user_err!("{}: no test images", job.data.display()));
    }
    Ok(images)
}

/// Writes the facts file for `images`, generating what the cache lacks.
pub fn run(job: &Job, images: &[TestImage], backbone: &mut dyn Generator, quiet: bool) -> Result<Summary> {
    let t0 = std::time::Instant::now();
    let name = backbone.name().to_string();
    let cache_file = cache_path(&job.out);
    let mut cache = Cache::open(&cache_file)?;
    if cache.loaded.torn_tail || cache.loaded.bad_lines > 0 {
        eprintln!(
            "note: {}: {}{} ignored; what they held is generated again",
            cache_file.display(),
            if cache.loaded.torn_tail { "a torn last line (from an interrupted run)" } else { "" },
            match cache.loaded.bad_lines {
                0 => String::new(),
                n => format!("{}{n} unreadable lines", if cache.loaded.torn_tail { " and " } else { "" }),
            }
        );
    }
    let pb = progress_bar((images.len() * job.sentences) as u64, "facts", quiet);
    let (mut generated, mut cached) = (0, 0);
    let mut lines = Vec::with_capacity(images.len());
    for img in images {
        let sha = sha256_file(&img.image)?;
        let prompts = prompts::prompts(img.category.as_deref(), job.sentences);
        let mut raws = Vec::with_capacity(prompts.len());
        for prompt in &prompts {
            let o = &job.options;
            let raw = if let Some(r) = cache.for_image(&sha, prompt, &name, o) {
                cached += 1;
                r.text.clone()
            } else {
                let (text, reused) = match cache.generation(prompt, &name, o) {
                    Some(r) => (r.text.clone(), true),
                    None => (backbone.generate(prompt, o)?, false),
                };
                if reused {
                    cached += 1;
                } else {
                    generated += 1;
                }
                cache.append(Record {
                    image_sha256: sha.clone(),
                    image: img.image.clone(),
                    prompt: prompt.clone(),
                    backbone: name.clone(),
                    options: o.clone(),
                    text: text.clone(),
                    reused,
                })?;
                text
            };
            raws.push(raw);
            pb.inc(1);
        }
        lines.push(image_facts(img, sha, prompts, &raws, &name, &job.options));
    }
    pb.finish_and_clear();
    let mut text = String::new();
    for l in &lines {
        text.push_str(&serde_json::to_string(l)?);
        text.push('\n');
    }
    write_atomic(&job.out, text.as_bytes())?;
    Ok(Summary {
        images: images.len(),
        generated,
        cached,
        out: job.out.clone(),
        cache: cache_file,
        facts: lines.iter().map(|l| l.facts.len()).sum(),
        dropped: lines.iter().map(|l| l.dropped.len()).sum(),
        cache_loaded: cache.loaded,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One output line from the raw generations of one image's prompts.
pub fn image_facts(
    img: &TestImage,
    sha: String,
    prompts: Vec<String>,
    raws: &[String],
    backbone: &str,
    options: &GenOptions,
) -> ImageFacts {
    let mut facts: Vec<String> = Vec::new();
    let mut keys: HashSet<String> = HashSet::new();
    let mut dropped = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        match clean::first_sentence(raw) {
            None => dropped.push(Dropped { prompt: i, reason: "empty".into(), raw: raw.clone() }),
            Some(s) => {
                let key = clean::dedup_key(&s);
                if keys.insert(key.clone()) {
                    facts.push(s);
                } else {
                    let k = facts.iter().position(|f| clean::dedup_key(f) == key).unwrap_or(0);
                    dropped.push(Dropped { prompt: i, reason: format!("duplicate of fact {k}"), raw: raw.clone() });
                }
            }
        }
    }
    ImageFacts {
        image: img.image.clone(),
        image_sha256: sha,
        category: img.category.clone(),
        facts,
        prompts,
        backbone: backbone.to_string(),
        generation: options.clone(),
        dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        calls: Vec<String>,
        replies: HashMap<String, String>,
    }

    impl Generator for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn generate(&mut self, prompt: &str, _: &GenOptions) -> Result<String> {
            self.calls.push(prompt.to_string());
            Ok(self.replies.get(prompt).cloned().unwrap_or_else(|| format!("Fact about: {prompt}")))
        }
    }

    fn opts() -> GenOptions {
        GenOptions { max_tokens: 8, temperature: 0.0, top_p: 0.9, seed: 0, system: None }
    }

    fn sample(id: &str, image: &Path, category: Option<&str>) -> Sample {
        serde_json::from_value(serde_json::json!({"id": id, "test_image": image, "category": category})).unwrap()
    }

    #[test]
    fn distinct_images_keep_dataset_order_and_the_limit() {
        let (a, b, c) = (Path::new("/a.png"), Path::new("/b.png"), Path::new("/c.png"));
        let s = vec![sample("1", b, None), sample("2", a, Some("x")), sample("3", b, Some("y")), sample("4", c, None)];
        let imgs = test_images(&s, 0);
        assert_eq!(
            imgs,
            vec![
                TestImage { image: b.into(), category: Some("y".into()) },
                TestImage { image: a.into(), category: Some("x".into()) },
                TestImage { image: c.into(), category: None },
            ]
        );
        assert_eq!(test_images(&s, 2).len(), 2);
    }

    #[test]
    fn empty_and_duplicate_generations_are_recorded_not_invented() {
        let img = TestImage { image: "/a.png".into(), category: Some("bottle".into()) };
        let raws: Vec<String> = ["Glass can crack.", "  \n", "- glass can crack!", "Labels peel off."]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let f = image_facts(&img, "00".into(), prompts::prompts(Some("bottle"), 4), &raws, "fake", &opts());
        assert_eq!(f.facts, vec!["Glass can crack.", "Labels peel off."]);
        assert_eq!(f.dropped.len(), 2);
        assert_eq!((f.dropped[0].prompt, f.dropped[0].reason.as_str()), (1, "empty"));
        assert_eq!((f.dropped[1].prompt, f.dropped[1].reason.as_str()), (2, "duplicate of fact 0"));
        let line = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<ImageFacts>(&line).unwrap(), f);
    }

    #[test]
    fn generations_are_shared_across_images_of_a_category_and_resumed_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut images = Vec::new();
        for (i, cat) in ["cat", "cat", "dog"].iter().enumerate() {
            let p = dir.path().join(format!("{i}.png"));
            std::fs::write(&p, format!("image {i}")).unwrap();
            images.push(TestImage { image: p, category: Some(cat.to_string()) });
        }
        let job = Job {
            data: dir.path().join("unused.json"),
            format: None,
            image_root: None,
            out: dir.path().join("f.jsonl"),
            sentences: 2,
            limit: 0,
            options: opts(),
        };
        let mut g = Fake { calls: vec![], replies: HashMap::new() };
        let s = run(&job, &images, &mut g, true).unwrap();
        assert_eq!((s.images, s.generated, s.cached, s.facts), (3, 4, 2, 6));
        assert_eq!(g.calls.len(), 4);
        let first = std::fs::read(&job.out).unwrap();
        let set = FactSet::load(&job.out).unwrap();
        assert_eq!(set.items.len(), 3);
        assert_eq!(set.get(&images[1].image).unwrap().facts, set.get(&images[0].image).unwrap().facts);
        assert!(set.get(&images[2].image).unwrap().facts[0].contains("a dog"));

        // Everything is cached the second time; the file is the same.
        let s = run(&job, &images, &mut g, true).unwrap();
        assert_eq!((s.generated, s.cached), (0, 6));
        assert_eq!(g.calls.len(), 4);
        assert_eq!(std::fs::read(&job.out).unwrap(), first);

        // More sentences: only the new prompts are generated.
        let job3 = Job { sentences: 3, ..job.clone() };
        let s = run(&job3, &images, &mut g, true).unwrap();
        assert_eq!((s.generated, s.cached), (2, 7));
    }
}
