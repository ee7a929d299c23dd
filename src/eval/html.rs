//! One self-contained HTML page of an evaluation (`sage eval --html`, `sage demo`): a title and
//! an introduction, the summary tables, then one card per image pair with its test image, its
//! normal reference, the anomaly map with the patches the model selected, and its questions
//! (level, question, answer, truth, P(Yes), right or wrong). A small inline script filters the
//! questions by level, result and label; the filter is kept in the address (`#level=L1&result=wrong`).
//!
//! The page is built from plain values ([`ReportPage`]), so it does not depend on the model code.
//! Nothing is fetched: the images are thumbnails ([`THUMB`] px on the longer side) embedded as
//! base64 data URIs, PNG when that is small ([`PNG_BUDGET`]) and JPEG otherwise; grayscale images
//! stay grayscale. Measured on 40 ELPV cells (grayscale 300×300 PNGs, all three images end up
//! JPEG) with a reference, a 14×14 anomaly map and three questions per pair (the ignored test
//! `elpv_page_for_a_screenshot`): 20.4 KB per pair, 18.4 KB of it images as base64 (test 4.4 KB,
//! reference 3.8 KB, heat map 10.3 KB), so the ~466 pairs of an AD-PL evaluation with five
//! questions each make a page of about 10 MB.
//!
//! The heat maps share one colour scale over the whole page (the 1st to the 99th percentile of all
//! patch values, shown in the legend), so a normal pair looks cool beside an anomalous one. The
//! grid covers the whole test image, as `sage map` draws it.

use crate::image_io;
use anyhow::{bail, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, ImageEncoder, Rgb, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The longer side of every embedded image, in pixels (smaller images are scaled up, pixel by pixel).
pub const THUMB: u32 = 192;
/// An image whose PNG is larger than this is embedded as JPEG when that is smaller.
pub const PNG_BUDGET: usize = 6 * 1024;
const JPEG_QUALITY: u8 = 85;
/// How much of the colour map shows over the test image.
const ALPHA: f32 = 0.45;

/// The whole page.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportPage {
    pub title: String,
    /// A sentence or two, plain text.
    pub intro: String,
    pub summary: Vec<SummaryTable>,
    pub pairs: Vec<PairView>,
}

/// A table of the summary: `rows[r][c]` under `columns[c]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryTable {
    pub caption: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

/// A summary cell: text, or a number with an optional 95% interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Cell {
    Text(String),
    Number(Number),
}

/// A number shown with `digits` decimals, ×100 when `percent` (the column names the unit), with
/// `[lo, hi]` after it when both are present: `82.1 [78.0, 85.9]`. A non-finite value shows `—`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Number {
    pub value: f64,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    pub digits: usize,
    pub percent: bool,
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }

    /// `value` with `digits` decimals.
    pub fn num(value: f64, digits: usize) -> Cell {
        Cell::Number(Number { value, lo: None, hi: None, digits, percent: false })
    }

    /// A fraction shown as a percentage (×100) with `digits` decimals.
    pub fn percent(value: f64, digits: usize) -> Cell {
        Cell::Number(Number { value, lo: None, hi: None, digits, percent: true })
    }

    /// The same number with its 95% interval (in the value's units, before ×100); text is unchanged.
    pub fn with_interval(self, lo: f64, hi: f64) -> Cell {
        match self {
            Cell::Number(n) => Cell::Number(Number { lo: Some(lo), hi: Some(hi), ..n }),
            t => t,
        }
    }

    /// The cell as it is shown.
    pub fn format(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Number(n) => {
                let f = |x: f64| {
                    if !x.is_finite() {
                        return "—".to_string();
                    }
                    let x = if n.percent { 100.0 * x } else { x };
                    format!("{x:.*}", n.digits)
                };
                match (n.lo, n.hi) {
                    (Some(lo), Some(hi)) if n.value.is_finite() => format!("{} [{}, {}]", f(n.value), f(lo), f(hi)),
                    _ => f(n.value),
                }
            }
        }
    }
}

/// One image pair and the model's answers about it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairView {
    pub id: String,
    /// "normal" or "anomalous" (other text is shown as it is).
    pub label: Option<String>,
    pub test_image: PathBuf,
    pub reference_image: Option<PathBuf>,
    pub map: Option<HeatMap>,
    pub questions: Vec<QuestionView>,
}

/// An anomaly map over the test image.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeatMap {
    pub w: usize,
    pub h: usize,
    /// Row-major patch grid (`h` rows of `w`), larger = more anomalous.
    pub values: Vec<f32>,
    /// Indices into the grid of the patches the model selected (outlined).
    pub selected: Vec<usize>,
    pub image_score: Option<f32>,
}

/// One question, the model's answer and how it was scored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QuestionView {
    pub level: Option<String>,
    pub text: String,
    pub answer: String,
    pub truth: Option<String>,
    pub p_yes: Option<f64>,
    pub right: Option<bool>,
}

/// The page as one HTML document. Every image is loaded with [`image_io::load`]: a missing or
/// corrupt file is an error naming the pair and the path.
pub fn render(page: &ReportPage) -> Result<String> {
    let scale = map_scale(&page.pairs);
    let cards: Vec<String> =
        page.pairs.par_iter().enumerate().map(|(i, p)| render_pair(i, p, scale)).collect::<Result<_>>()?;
    let mut s = String::with_capacity(cards.iter().map(String::len).sum::<usize>() + 16 * 1024);
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    s.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(s, "<title>{}</title>", escape(&page.title));
    let _ = writeln!(s, "<style>{CSS}</style>\n</head>\n<body>");
    let _ = writeln!(s, "<header>\n<h1>{}</h1>", escape(&page.title));
    if !page.intro.is_empty() {
        let _ = writeln!(s, "<p class=\"intro\">{}</p>", escape(&page.intro));
    }
    s.push_str("</header>\n");
    if !page.summary.is_empty() {
        s.push_str("<section class=\"summary\">\n");
        for t in &page.summary {
            render_table(&mut s, t);
        }
        s.push_str("</section>\n");
    }
    render_controls(&mut s, page, scale);
    s.push_str("<main id=\"pairs\">\n");
    for c in &cards {
        s.push_str(c);
    }
    s.push_str("</main>\n");
    let _ = writeln!(s, "<script>{SCRIPT}</script>\n</body>\n</html>");
    Ok(s)
}

/// Renders the page and writes it to `path` atomically, creating its folder.
pub fn write(page: &ReportPage, path: &Path) -> Result<()> {
    let html = render(page)?;
    crate::util::write_atomic(path, html.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Escapes text for HTML content and for double- or single-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 (RFC 4648 §4) with padding.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

/// The colour scale shared by every heat map: the 1st and 99th percentiles of all finite patch
/// values (`None` without maps).
fn map_scale(pairs: &[PairView]) -> Option<(f32, f32)> {
    let mut v: Vec<f32> = pairs
        .iter()
        .filter_map(|p| p.map.as_ref())
        .flat_map(|m| m.values.iter().copied())
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f32::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let (lo, hi) = (at(0.01), at(0.99));
    Some(if hi > lo { (lo, hi) } else { (lo, lo + 1e-6) })
}

/// The image scaled so its longer side is [`THUMB`] (Triangle down, Nearest up), 8-bit, grayscale
/// when it has no colour.
fn thumbnail(img: &DynamicImage) -> DynamicImage {
    let (w, h) = img.dimensions();
    let filter = if w.max(h) > THUMB { FilterType::Triangle } else { FilterType::Nearest };
    let img = if img.color().has_color() {
        DynamicImage::ImageRgb8(img.to_rgb8())
    } else {
        DynamicImage::ImageLuma8(img.to_luma8())
    };
    img.resize(THUMB, THUMB, filter)
}

/// `img` (8-bit gray or RGB) as a data URI: PNG, or JPEG when the PNG is over [`PNG_BUDGET`] and
/// the JPEG is smaller.
fn data_uri(img: &DynamicImage) -> Result<String> {
    let (w, h) = img.dimensions();
    let color = img.color().into();
    let mut png = Vec::new();
    PngEncoder::new_with_quality(&mut png, CompressionType::Best, PngFilter::Adaptive)
        .write_image(img.as_bytes(), w, h, color)
        .context("encoding a PNG thumbnail")?;
    if png.len() > PNG_BUDGET {
        let mut jpeg = Vec::new();
        JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
            .write_image(img.as_bytes(), w, h, color)
            .context("encoding a JPEG thumbnail")?;
        if jpeg.len() < png.len() {
            return Ok(format!("data:image/jpeg;base64,{}", base64(&jpeg)));
        }
    }
    Ok(format!("data:image/png;base64,{}", base64(&png)))
}

/// Loads and shrinks one image of a pair; errors name the pair and the path.
fn load_thumb(id: &str, what: &str, path: &Path) -> Result<DynamicImage> {
    let img = image_io::load(path).with_context(|| format!("pair `{id}`: {what} image {}", path.display()))?;
    Ok(thumbnail(&img))
}

/// The map blended over the test thumbnail, with the selected patches outlined (white, with a
/// dark inner line when the patch is large enough to hold it).
fn heat_image(id: &str, base: &DynamicImage, m: &HeatMap, (lo, hi): (f32, f32)) -> Result<RgbImage> {
    if m.w == 0 || m.h == 0 || m.values.len() != m.w * m.h {
        bail!("pair `{id}`: the heat map has {} values for a {}×{} grid", m.values.len(), m.w, m.h);
    }
    if let Some(&k) = m.selected.iter().find(|&&k| k >= m.values.len()) {
        bail!("pair `{id}`: selected patch {k} is outside the {}×{} grid", m.w, m.h);
    }
    let mut img = image_io::overlay_heatmap(base, &m.values, m.h, m.w, lo, hi, ALPHA);
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    for &k in &m.selected {
        let (r, c) = (k / m.w, k % m.w);
        let (x0, x1) = (c * iw / m.w, ((c + 1) * iw / m.w).max(c * iw / m.w + 1) - 1);
        let (y0, y1) = (r * ih / m.h, ((r + 1) * ih / m.h).max(r * ih / m.h + 1) - 1);
        outline(&mut img, x0, y0, x1, y1, Rgb([255, 255, 255]));
        if x1 - x0 >= 5 && y1 - y0 >= 5 {
            outline(&mut img, x0 + 1, y0 + 1, x1 - 1, y1 - 1, Rgb([0, 0, 0]));
        }
    }
    Ok(img)
}

/// A one-pixel rectangle with corners `(x0, y0)` and `(x1, y1)`, inclusive.
fn outline(img: &mut RgbImage, x0: usize, y0: usize, x1: usize, y1: usize, c: Rgb<u8>) {
    for x in x0..=x1 {
        img.put_pixel(x as u32, y0 as u32, c);
        img.put_pixel(x as u32, y1 as u32, c);
    }
    for y in y0..=y1 {
        img.put_pixel(x0 as u32, y as u32, c);
        img.put_pixel(x1 as u32, y as u32, c);
    }
}

fn render_table(s: &mut String, t: &SummaryTable) {
    s.push_str("<table>\n");
    if !t.caption.is_empty() {
        let _ = writeln!(s, "<caption>{}</caption>", escape(&t.caption));
    }
    if !t.columns.is_empty() {
        s.push_str("<thead><tr>");
        for c in &t.columns {
            let _ = write!(s, "<th>{}</th>", escape(c));
        }
        s.push_str("</tr></thead>\n");
    }
    s.push_str("<tbody>\n");
    for row in &t.rows {
        s.push_str("<tr>");
        for cell in row {
            let class = if matches!(cell, Cell::Number(_)) { " class=\"n\"" } else { "" };
            let _ = write!(s, "<td{class}>{}</td>", escape(&cell.format()));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody>\n</table>\n");
}

/// The distinct values in first-seen order, `None` last.
fn distinct<'a>(it: impl Iterator<Item = Option<&'a str>>) -> Vec<Option<&'a str>> {
    let mut out: Vec<Option<&str>> = Vec::new();
    for v in it {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out.sort_by_key(|v| v.is_none());
    out
}

fn render_select(s: &mut String, id: &str, label: &str, options: &[(String, String)]) {
    let _ = write!(s, "<label>{label} <select id=\"{id}\"><option value=\"*\">all</option>");
    for (value, text) in options {
        let _ = write!(s, "<option value=\"{}\">{}</option>", escape(value), escape(text));
    }
    s.push_str("</select></label>\n");
}

fn render_controls(s: &mut String, page: &ReportPage, scale: Option<(f32, f32)>) {
    s.push_str("<section class=\"controls\" id=\"filters\">\n");
    let questions = || page.pairs.iter().flat_map(|p| &p.questions);
    let levels = distinct(questions().map(|q| q.level.as_deref()));
    let opts: Vec<(String, String)> =
        levels.iter().map(|l| (l.unwrap_or("").to_string(), l.unwrap_or("(no level)").to_string())).collect();
    render_select(s, "f-level", "Level", &opts);
    let mut results = vec![("right".to_string(), "right".to_string()), ("wrong".to_string(), "wrong".to_string())];
    if questions().any(|q| q.right.is_none()) {
        results.push(("none".into(), "not scored".into()));
    }
    render_select(s, "f-result", "Result", &results);
    let labels = distinct(page.pairs.iter().map(|p| p.label.as_deref()));
    let opts: Vec<(String, String)> =
        labels.iter().map(|l| (l.unwrap_or("").to_string(), l.unwrap_or("(no label)").to_string())).collect();
    render_select(s, "f-label", "Label", &opts);
    let n_q: usize = page.pairs.iter().map(|p| p.questions.len()).sum();
    let _ = writeln!(s, "<span id=\"f-count\">{} pairs, {n_q} questions</span>", page.pairs.len());
    if let Some((lo, hi)) = scale {
        let _ = writeln!(
            s,
            "<span class=\"legend\" title=\"one colour scale for every heat map; white boxes: the patches the model \
             selected\">heat map {lo:.3} <span class=\"bar\"></span> {hi:.3}</span>"
        );
    }
    s.push_str("</section>\n");
}

fn label_class(label: Option<&str>) -> &'static str {
    match label.map(|l| l.to_ascii_lowercase()) {
        Some(l) if l == "normal" || l == "good" => "normal",
        Some(l) if l == "anomalous" || l == "anomaly" || l == "defective" => "anomalous",
        _ => "other",
    }
}

fn figure(s: &mut String, uri: Option<&str>, (w, h): (u32, u32), alt: &str, title: &str, caption: &str) {
    s.push_str("<figure>");
    match uri {
        Some(u) => {
            let _ = write!(
                s,
                "<img src=\"{u}\" width=\"{w}\" height=\"{h}\" alt=\"{}\" title=\"{}\">",
                escape(alt),
                escape(title)
            );
        }
        None => s.push_str("<div class=\"noimg\">none</div>"),
    }
    let _ = writeln!(s, "<figcaption>{}</figcaption></figure>", escape(caption));
}

fn render_pair(index: usize, p: &PairView, scale: Option<(f32, f32)>) -> Result<String> {
    let test = load_thumb(&p.id, "test", &p.test_image)?;
    let reference = match &p.reference_image {
        Some(path) => Some(load_thumb(&p.id, "reference", path)?),
        None => None,
    };
    let heat = match (&p.map, scale) {
        (Some(m), Some(scale)) => Some(heat_image(&p.id, &test, m, scale)?),
        _ => None,
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<article class=\"pair\" id=\"pair-{index}\" data-label=\"{}\">",
        escape(p.label.as_deref().unwrap_or(""))
    );
    let _ = write!(s, "<h2><span class=\"id\">{}</span>", escape(&p.id));
    if let Some(l) = &p.label {
        let _ = write!(s, " <span class=\"tag {}\">{}</span>", label_class(Some(l)), escape(l));
    }
    let scored: Vec<bool> = p.questions.iter().filter_map(|q| q.right).collect();
    if !scored.is_empty() {
        let _ =
            write!(s, " <span class=\"tally\">{}/{} right</span>", scored.iter().filter(|r| **r).count(), scored.len());
    }
    s.push_str("</h2>\n<div class=\"body\">\n<div class=\"figs\">\n");
    figure(
        &mut s,
        Some(&data_uri(&test)?),
        test.dimensions(),
        &format!("test image of {}", p.id),
        &p.test_image.display().to_string(),
        "test",
    );
    match (&reference, &p.reference_image) {
        (Some(r), Some(path)) => figure(
            &mut s,
            Some(&data_uri(r)?),
            r.dimensions(),
            &format!("reference image of {}", p.id),
            &path.display().to_string(),
            "reference",
        ),
        _ => figure(&mut s, None, (THUMB, THUMB), "", "", "no reference"),
    }
    if let (Some(img), Some(m)) = (heat, &p.map) {
        let dims = img.dimensions();
        let mut caption = "anomaly map".to_string();
        if let Some(score) = m.image_score {
            let _ = write!(caption, " · score {score:.3}");
        }
        if !m.selected.is_empty() {
            let _ = write!(caption, " · {} selected", m.selected.len());
        }
        figure(
            &mut s,
            Some(&data_uri(&DynamicImage::ImageRgb8(img))?),
            dims,
            &format!("anomaly map of {}", p.id),
            &format!("{}×{} patches; white boxes: the patches the model selected", m.w, m.h),
            &caption,
        );
    }
    s.push_str("</div>\n");
    if !p.questions.is_empty() {
        s.push_str(
            "<table class=\"qs\"><thead><tr><th>Level</th><th>Question</th><th>Answer</th><th>Truth</th>\
             <th>P(Yes)</th><th></th></tr></thead>\n<tbody>\n",
        );
        for q in &p.questions {
            let (result, badge) = match q.right {
                Some(true) => ("right", "✓ right"),
                Some(false) => ("wrong", "✗ wrong"),
                None => ("none", "—"),
            };
            let level = q.level.as_deref().unwrap_or("");
            let _ = writeln!(
                s,
                "<tr class=\"q\" data-level=\"{}\" data-result=\"{result}\"><td>{}</td><td>{}</td><td class=\"a\">{}</td>\
                 <td>{}</td><td class=\"n\">{}</td><td><span class=\"badge {result}\">{badge}</span></td></tr>",
                escape(level),
                escape(level),
                escape(&q.text),
                escape(&q.answer),
                escape(q.truth.as_deref().unwrap_or("—")),
                q.p_yes.map_or("—".to_string(), |p| format!("{p:.2}")),
            );
        }
        s.push_str("</tbody></table>\n");
    }
    s.push_str("</div>\n</article>\n");
    Ok(s)
}

const CSS: &str = r#"
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--ok:#1a7f37;--bad:#cf222e}
*{box-sizing:border-box}
[hidden]{display:none!important}
body{margin:0;padding:16px 24px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:#fff}
h1{font-size:22px;margin:0 0 6px}
.intro{color:var(--muted);max-width:70em;margin:0 0 14px}
.summary{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start;margin-bottom:14px}
table{border-collapse:collapse}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--bg);font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.controls{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid var(--line);padding:8px 0;margin-bottom:12px;display:flex;flex-wrap:wrap;gap:18px;align-items:center}
#f-count{color:var(--muted)}
.legend{color:var(--muted);font-size:12px}
.legend .bar{display:inline-block;width:120px;height:10px;vertical-align:middle;border:1px solid var(--line);background:linear-gradient(to right,#00007f,#0000ff 12.5%,#00ffff 37.5%,#ffff00 62.5%,#ff0000 87.5%,#7f0000)}
.pair{border:1px solid var(--line);border-radius:6px;padding:10px 12px;margin-bottom:12px}
.pair h2{font-size:15px;margin:0 0 8px;display:flex;gap:8px;align-items:center}
.tag{font-size:12px;padding:1px 8px;border-radius:10px;background:var(--bg);border:1px solid var(--line);font-weight:500}
.tag.anomalous{background:#ffebe9;border-color:#ffcecb;color:#a40e26}
.tag.normal{background:#dafbe1;border-color:#aceebb;color:#116329}
.tally{font-size:12px;font-weight:400;color:var(--muted)}
.body{display:flex;gap:14px;align-items:flex-start}
.figs{display:flex;gap:8px;flex:none}
figure{margin:0;text-align:center;font-size:12px;color:var(--muted)}
figure img,.noimg{display:block;width:192px;height:192px;object-fit:contain;background:var(--bg);border:1px solid var(--line)}
.noimg{display:flex;align-items:center;justify-content:center}
table.qs{flex:1;min-width:0}
.qs td.a{white-space:pre-wrap}
.badge{font-size:12px;font-weight:600;padding:1px 6px;border-radius:4px;white-space:nowrap}
.badge.right{color:#fff;background:var(--ok)}
.badge.wrong{color:#fff;background:var(--bad)}
.badge.none{color:var(--muted);background:var(--bg)}
@media (max-width:1000px){.body{flex-direction:column}}
"#;

/// Hides the question rows the filters exclude, and the cards left without a visible question;
/// reads and writes the filters in the address's fragment.
const SCRIPT: &str = r##"
(function () {
  var keys = ["level", "result", "label"];
  var sel = {};
  keys.forEach(function (k) { sel[k] = document.getElementById("f-" + k); });
  var count = document.getElementById("f-count");
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.pair"));
  var params = new URLSearchParams(location.hash.slice(1));
  keys.forEach(function (k) {
    var v = params.get(k);
    if (v !== null && Array.prototype.some.call(sel[k].options, function (o) { return o.value === v; })) sel[k].value = v;
  });
  function apply() {
    var lv = sel.level.value, rs = sel.result.value, lb = sel.label.value;
    var shownCards = 0, shownQ = 0, allQ = 0;
    cards.forEach(function (card) {
      var labelOk = lb === "*" || card.getAttribute("data-label") === lb;
      var rows = card.querySelectorAll("tr.q"), vis = 0;
      Array.prototype.forEach.call(rows, function (tr) {
        var ok = labelOk && (lv === "*" || tr.getAttribute("data-level") === lv) &&
          (rs === "*" || tr.getAttribute("data-result") === rs);
        tr.hidden = !ok;
        if (ok) vis++;
      });
      allQ += rows.length;
      var show = labelOk && (vis > 0 || (rows.length === 0 && lv === "*" && rs === "*"));
      card.hidden = !show;
      if (show) { shownCards++; shownQ += vis; }
    });
    count.textContent = "showing " + shownCards + " of " + cards.length + " pairs, " + shownQ + " of " + allQ + " questions";
    var h = keys.filter(function (k) { return sel[k].value !== "*"; })
      .map(function (k) { return k + "=" + encodeURIComponent(sel[k].value); }).join("&");
    try { history.replaceState(null, "", h ? "#" + h : location.pathname + location.search); } catch (e) {}
  }
  keys.forEach(function (k) { sel[k].addEventListener("change", apply); });
  apply();
})();
"##;

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd, 0x00]), "//79AA==");
    }

    #[test]
    fn escape_covers_text_and_attributes() {
        assert_eq!(
            escape(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(escape("plain — ü"), "plain — ü");
    }

    #[test]
    fn cells_format_with_intervals() {
        assert_eq!(Cell::percent(0.821, 1).with_interval(0.78, 0.859).format(), "82.1 [78.0, 85.9]");
        assert_eq!(Cell::num(0.91234, 3).format(), "0.912");
        assert_eq!(Cell::num(f64::NAN, 3).with_interval(0.1, 0.2).format(), "—");
        assert_eq!(Cell::text("Acc-G").with_interval(0.0, 1.0).format(), "Acc-G");
        let json = serde_json::to_string(&vec![Cell::text("a"), Cell::num(1.5, 1)]).unwrap();
        let back: Vec<Cell> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, vec![Cell::text("a"), Cell::num(1.5, 1)]);
    }

    /// A small two-tone image: flat blocks stay small as PNG.
    fn write_png(dir: &Path, name: &str, rgb: bool, shade: u8) -> PathBuf {
        let path = dir.join(name);
        if rgb {
            RgbImage::from_fn(12, 10, |x, _| if x < 6 { Rgb([shade, 40, 40]) } else { Rgb([40, 40, shade]) })
                .save(&path)
                .unwrap();
        } else {
            GrayImage::from_fn(10, 10, |_, y| Luma([if y < 5 { shade } else { 30 }])).save(&path).unwrap();
        }
        path
    }

    fn question(level: &str, text: &str, answer: &str, right: Option<bool>) -> QuestionView {
        QuestionView {
            level: Some(level.into()),
            text: text.into(),
            answer: answer.into(),
            truth: Some("Yes".into()),
            p_yes: Some(0.8125),
            right,
        }
    }

    fn two_pairs(dir: &Path) -> ReportPage {
        ReportPage {
            title: "sage <eval>".into(),
            intro: "Two tiny pairs & a \"test\".".into(),
            summary: vec![SummaryTable {
                caption: "Accuracy (%)".into(),
                columns: vec!["level".into(), "accuracy".into()],
                rows: vec![
                    vec![Cell::text("L1"), Cell::percent(0.821, 1).with_interval(0.78, 0.859)],
                    vec![Cell::text("Acc-G"), Cell::percent(0.5, 1).with_interval(0.125, 0.875)],
                ],
            }],
            pairs: vec![
                PairView {
                    id: "cell<1>".into(),
                    label: Some("anomalous".into()),
                    test_image: write_png(dir, "t1.png", true, 220),
                    reference_image: Some(write_png(dir, "r1.png", true, 90)),
                    map: Some(HeatMap {
                        w: 4,
                        h: 4,
                        values: (0..16).map(|i| i as f32 / 15.0).collect(),
                        selected: vec![15, 14],
                        image_score: Some(1.0),
                    }),
                    questions: vec![
                        question("L1", "Is there an anomaly?", "Yes. <script>alert('x')</script>", Some(true)),
                        question("L2", "Is it a \"crack\"?", "No.", Some(false)),
                    ],
                },
                PairView {
                    id: "cell2".into(),
                    label: Some("normal".into()),
                    test_image: write_png(dir, "t2.png", false, 200),
                    reference_image: None,
                    map: None,
                    questions: vec![question("L1", "Is there an anomaly?", "No.", None)],
                },
            ],
        }
    }

    #[test]
    fn renders_a_self_contained_page() {
        let dir = tempfile::tempdir().unwrap();
        let page = two_pairs(dir.path());
        let html = render(&page).unwrap();
        // The summary, with intervals.
        assert!(html.contains("<td class=\"n\">82.1 [78.0, 85.9]</td>"), "{html}");
        assert!(html.contains("<td class=\"n\">50.0 [12.5, 87.5]</td>"));
        // Three images in the first pair (test, reference, map), one in the second: all PNG.
        assert_eq!(html.matches("data:image/").count(), 4);
        assert_eq!(html.matches("data:image/png;base64,").count(), 4);
        // Escaped text: only our own script tag is there.
        assert_eq!(html.matches("<script>").count(), 1);
        assert!(html.contains("Yes. &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(html.contains("<title>sage &lt;eval&gt;</title>"));
        assert!(html.contains("Two tiny pairs &amp; a &quot;test&quot;."));
        assert!(html.contains("Is it a &quot;crack&quot;?"));
        assert!(html.contains("<span class=\"id\">cell&lt;1&gt;</span>"));
        // Question rows carry what the filters read; the badges and P(Yes).
        assert!(html.contains("<tr class=\"q\" data-level=\"L2\" data-result=\"wrong\">"));
        assert!(html.contains("<span class=\"badge right\">✓ right</span>"));
        assert!(html.contains("<span class=\"badge none\">—</span>"));
        assert!(html.contains("<td class=\"n\">0.81</td>"));
        assert!(html.contains("1/2 right"));
        assert!(html.contains("score 1.000 · 2 selected"));
        assert!(html.contains("no reference"));
        // The filter controls, with the levels, results and labels present.
        for id in ["f-level", "f-result", "f-label"] {
            assert!(html.contains(&format!("<select id=\"{id}\">")), "{id}");
        }
        assert!(html.contains("<option value=\"L2\">L2</option>"));
        assert!(html.contains("<option value=\"none\">not scored</option>"));
        assert!(html.contains("<option value=\"anomalous\">anomalous</option>"));
        // Nothing outside the page.
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!html.contains("src=\"/") && !html.contains("url("));
    }

    #[test]
    fn selected_patches_are_outlined() {
        let base = DynamicImage::ImageLuma8(GrayImage::from_pixel(192, 192, Luma([128])));
        let m = HeatMap { w: 4, h: 4, values: vec![0.0; 16], selected: vec![5], image_score: None };
        let img = heat_image("x", &base, &m, (0.0, 1.0)).unwrap();
        // Patch 5 is row 1, column 1: pixels 48..=95 both ways.
        assert_eq!(img.get_pixel(48, 60), &Rgb([255, 255, 255]));
        assert_eq!(img.get_pixel(95, 95), &Rgb([255, 255, 255]));
        assert_eq!(img.get_pixel(49, 60), &Rgb([0, 0, 0]));
        assert_ne!(img.get_pixel(70, 70), &Rgb([255, 255, 255]));
        assert_ne!(img.get_pixel(10, 10), &Rgb([255, 255, 255]));
        let bad = HeatMap { selected: vec![16], ..m.clone() };
        assert!(heat_image("x", &base, &bad, (0.0, 1.0)).unwrap_err().to_string().contains("selected patch 16"));
        let short = HeatMap { values: vec![0.0; 15], ..m };
        assert!(heat_image("x", &base, &short, (0.0, 1.0)).unwrap_err().to_string().contains("15 values"));
    }

    #[test]
    fn a_missing_image_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut page = two_pairs(dir.path());
        let missing = dir.path().join("nope.png");
        page.pairs[1].reference_image = Some(missing.clone());
        let err = render(&page).unwrap_err();
        let text = format!("{err:#}");
        assert!(err.to_string().contains(&missing.display().to_string()), "{text}");
        assert!(text.contains("cell2") && text.contains("reference"), "{text}");
        assert!(crate::error::is_user_error(&err));
    }

    #[test]
    fn write_is_atomic_and_creates_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let page = two_pairs(dir.path());
        let out = dir.path().join("sub/report.html");
        write(&page, &out).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), render(&page).unwrap());
    }

    /// Real ELPV cells with real anomaly maps (needs `sage fetch`): writes
    /// `$SAGE_REPORT_HTML` (default /tmp/sage-report-elpv.html) and prints the bytes per pair.
    /// `scripts/report_screenshot.sh` takes its picture.
    #[test]
    #[ignore]
    fn elpv_page_for_a_screenshot() {
        use crate::assets::Asset;
        use crate::models::anomaly_map::AnomalyMapper;
        use crate::models::efficientnet::EfficientNetLite;
        use crate::models::patch_encoder::PatchEncoder;
        use crate::ops::similarity::Reduce;
        let n: usize = std::env::var("SAGE_REPORT_PAIRS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
        let out = std::env::var("SAGE_REPORT_HTML").unwrap_or_else(|_| "/tmp/sage-report-elpv.html".into());
        let cells = crate::data::elpv::load(&Asset::ElpvDir.path().unwrap()).unwrap();
        let mono = |c: &&crate::data::elpv::Cell| c.kind == "mono";
        let normals: Vec<_> = cells.iter().filter(mono).filter(|c| c.is_normal()).collect();
        let defects: Vec<_> = cells.iter().filter(mono).filter(|c| c.is_defective()).collect();
        let reference = normals[0];
        let net = EfficientNetLite::load(&Asset::EfficientNetPth.path().unwrap()).unwrap();
        let mapper = AnomalyMapper { encoder: PatchEncoder::EfficientNet(net), reduce: Reduce::Nearest, k: 8 };
        let ref_tokens = mapper.tokens(&image_io::load(&reference.path).unwrap()).unwrap();
        let mut pairs = Vec::new();
        for i in 0..n {
            let (cell, anomalous) = if i % 2 == 0 { (defects[i / 2], true) } else { (normals[1 + i / 2], false) };
            let m = mapper
                .compare(&mapper.tokens(&image_io::load(&cell.path).unwrap()).unwrap(), Some(&ref_tokens))
                .unwrap();
            // Made-up answers: the map's verdict at a fixed threshold, so some are wrong.
            let says_yes = m.score > 0.3;
            let yes_no = |b: bool| if b { "Yes" } else { "No" };
            let questions = vec![
                QuestionView {
                    level: Some("L1".into()),
                    text: "Is there any anomaly in the test image compared with the normal reference?".into(),
                    answer: format!(
                        "{}. The most dissimilar patch scores {:.3}; {}",
                        yes_no(says_yes),
                        m.score,
                        if says_yes { "a dark crack crosses the cell." } else { "the cell looks like the reference." }
                    ),
                    truth: Some(yes_no(anomalous).into()),
                    p_yes: Some(m.score as f64),
                    right: Some(says_yes == anomalous),
                },
                QuestionView {
                    level: Some("L2".into()),
                    text: "Is the anomaly a crack <or> an inactive region?".into(),
                    answer: "Yes, a \"crack\" near the busbar.".into(),
                    truth: Some(yes_no(anomalous).into()),
                    p_yes: None,
                    right: Some(anomalous),
                },
                QuestionView {
                    level: Some("L3".into()),
                    text: "Is the defect in the upper half of the cell?".into(),
                    answer: "No.".into(),
                    truth: None,
                    p_yes: Some(0.25),
                    right: None,
                },
            ];
            let name = cell.path.file_stem().unwrap().to_string_lossy().to_string();
            pairs.push(PairView {
                id: name,
                label: Some(if anomalous { "anomalous" } else { "normal" }.into()),
                test_image: cell.path.clone(),
                reference_image: Some(reference.path.clone()),
                map: Some(HeatMap {
                    w: m.grid_w,
                    h: m.grid_h,
                    values: m.map.clone(),
                    selected: m.patches.topk.iter().map(|&k| k as usize).collect(),
                    image_score: Some(m.score),
                }),
                questions,
            });
        }
        let summary = vec![
            SummaryTable {
                caption: "Accuracy per level (%)".into(),
                columns: vec!["level".into(), "accuracy".into(), "n".into()],
                rows: vec![
                    vec![Cell::text("L1"), Cell::percent(0.821, 1).with_interval(0.780, 0.859), Cell::num(466.0, 0)],
                    vec![Cell::text("L2"), Cell::percent(0.645, 1).with_interval(0.600, 0.688), Cell::num(466.0, 0)],
                    vec![Cell::text("Acc-G"), Cell::percent(0.412, 1).with_interval(0.368, 0.457), Cell::num(466.0, 0)],
                ],
            },
            SummaryTable {
                caption: "Anomaly map".into(),
                columns: vec!["metric".into(), "value".into()],
                rows: vec![vec![Cell::text("image AUROC"), Cell::num(0.912, 3).with_interval(0.880, 0.940)]],
            },
        ];
        let empty = ReportPage { title: "t".into(), ..Default::default() };
        let page = ReportPage {
            title: "sage eval — ELPV (screenshot check)".into(),
            intro: "Mono cells against one normal reference; the maps are real (EfficientNet-Lite0, nearest \
                    reduce), the answers are made up from the map's score."
                .into(),
            summary,
            pairs,
        };
        let html = render(&page).unwrap();
        let base = render(&ReportPage { summary: page.summary.clone(), ..empty }).unwrap().len();
        write(&page, Path::new(&out)).unwrap();
        let per_pair = (html.len() - base) / n;
        let images: usize = html.split("data:image/").skip(1).map(|s| s.find('"').unwrap()).sum();
        println!("{out}: {} bytes, {n} pairs, {per_pair} bytes per pair ({} of images)", html.len(), images / n);
    }
}
