//! PNG and JPEG: the test images (and images encoded from them), mutated chunk by chunk / segment
//! by segment, each decoded by `image_io::load` and turned into a model input by `to_chw` with
//! EfficientNet's preprocessing, as `classify` and `map` do.

use super::mutate::{self, FuzzRng};
use super::runner::{no_setup, Target};
use image::{DynamicImage, ImageFormat};
use rand::Rng;
use std::io::Cursor;
use std::path::Path;

fn test_image(name: &str) -> Vec<u8> {
    let p = crate::common::sage_home().join("test-images").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-test-images.sh", p.display()))
}

fn encode(img: &DynamicImage, f: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(vec![]);
    img.write_to(&mut out, f).unwrap();
    out.into_inner()
}

/// A small synthetic image whose width × height is `w × h` (gradient content).
fn synthetic(w: u32, h: u32, gray: bool) -> DynamicImage {
    let rgb = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, ((x + y) * 5) as u8]));
    let img = DynamicImage::ImageRgb8(rgb);
    if gray {
        DynamicImage::ImageLuma8(img.to_luma8())
    } else {
        img
    }
}

fn png_seeds() -> Vec<Vec<u8>> {
    let chelsea = image::load_from_memory(&test_image("chelsea.png")).unwrap();
    let small = chelsea.thumbnail(64, 64);
    vec![
        test_image("coffee.png"),
        test_image("chelsea.png"),
        encode(&small, ImageFormat::Png),
        encode(&DynamicImage::ImageLuma16(small.to_luma16()), ImageFormat::Png),
        encode(&DynamicImage::ImageRgba8(small.to_rgba8()), ImageFormat::Png),
        encode(&DynamicImage::ImageLumaA8(small.to_luma_alpha8()), ImageFormat::Png),
    ]
}

fn jpeg_seeds() -> Vec<Vec<u8>> {
    let chelsea = image::load_from_memory(&test_image("chelsea.png")).unwrap();
    vec![
        encode(&DynamicImage::ImageRgb8(chelsea.to_rgb8()), ImageFormat::Jpeg),
        encode(&DynamicImage::ImageRgb8(chelsea.thumbnail(64, 64).to_rgb8()), ImageFormat::Jpeg),
        encode(&DynamicImage::ImageLuma8(chelsea.thumbnail(80, 40).to_luma8()), ImageFormat::Jpeg),
    ]
}

/// Shapes that stress resizing: extreme aspect ratios and single-pixel sides, validly encoded.
fn extreme_shape(rng: &mut FuzzRng, f: ImageFormat) -> Vec<u8> {
    let long = *mutate::pick(rng, &[1u32, 2, 3, 223, 224, 257, 4000, 20000, 60000]);
    let short = *mutate::pick(rng, &[1u32, 2, 3, 7]);
    let (w, h) = if rng.random_bool(0.5) { (long, short) } else { (short, long) };
    encode(&synthetic(w, h, rng.random_bool(0.5)), f)
}

// --- PNG ------------------------------------------------------------------------------------

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

struct Chunk {
    kind: [u8; 4],
    data: Vec<u8>,
}

const PNG_SIG: &[u8] = b"\x89PNG\r\n\x1a\n";

fn png_chunks(data: &[u8]) -> Option<Vec<Chunk>> {
    let mut rest = data.strip_prefix(PNG_SIG)?;
    let mut out = vec![];
    while rest.len() >= 12 {
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        if rest.len() < 12 + n {
            return None;
        }
        out.push(Chunk { kind: rest[4..8].try_into().unwrap(), data: rest[8..8 + n].to_vec() });
        rest = &rest[12 + n..];
    }
    Some(out)
}

fn png_bytes(chunks: &[Chunk], fix_crc: bool) -> Vec<u8> {
    let mut out = PNG_SIG.to_vec();
    for c in chunks {
        out.extend((c.data.len() as u32).to_be_bytes());
        out.extend(c.kind);
        out.extend(&c.data);
        let crc = crc32(&[&c.kind[..], &c.data].concat());
        out.extend(if fix_crc { crc } else { crc ^ 1 }.to_be_bytes());
    }
    out
}

fn mutate_png(data: &[u8], rng: &mut FuzzRng) -> Vec<u8> {
    if rng.random_bool(0.15) {
        return extreme_shape(rng, ImageFormat::Png);
    }
    let Some(mut chunks) = png_chunks(data) else { return mutate::bytes(rng, data, PNG_SIG) };
    if chunks.is_empty() {
        return mutate::bytes(rng, data, PNG_SIG);
    }
    match rng.random_range(0..9) {
        // IHDR: width, height (big-endian u32), bit depth, colour type, interlace
        0..=3 => {
            if let Some(ihdr) = chunks.iter_mut().find(|c| &c.kind == b"IHDR" && c.data.len() >= 13) {
                match rng.random_range(0..5) {
                    0 | 1 => {
                        let at = if rng.random_bool(0.5) { 0 } else { 4 };
                        let old = u32::from_be_bytes(ihdr.data[at..at + 4].try_into().unwrap());
                        let v = mutate::int_near(rng, old as i128) as u32;
                        ihdr.data[at..at + 4].copy_from_slice(&v.to_be_bytes());
                    }
                    2 => ihdr.data[8] = *mutate::pick(rng, &[0u8, 1, 2, 3, 4, 8, 16, 32, 255]),
                    3 => ihdr.data[9] = *mutate::pick(rng, &[0u8, 1, 2, 3, 4, 5, 6, 7, 255]),
                    _ => ihdr.data[12] = *mutate::pick(rng, &[0u8, 1, 2]),
                }
            }
        }
        // a chunk's data cut short, or grown
        4 => {
            let i = rng.random_range(0..chunks.len());
            let c = &mut chunks[i].data;
            if rng.random_bool(0.7) {
                let n = rng.random_range(0..=c.len());
                c.truncate(n);
            } else {
                c.extend(std::iter::repeat_n(0u8, rng.random_range(1..64)));
            }
        }
        5 => {
            let i = rng.random_range(0..chunks.len());
            chunks.remove(i);
        }
        6 => {
            let i = rng.random_range(0..chunks.len());
            let dup = Chunk { kind: chunks[i].kind, data: chunks[i].data.clone() };
            let at = rng.random_range(0..=chunks.len());
            chunks.insert(at, dup);
        }
        // damage inside the compressed image data, CRC kept valid so the inflater sees it
        7 => {
            if let Some(idat) = chunks.iter_mut().find(|c| &c.kind == b"IDAT" && !c.data.is_empty()) {
                idat.data = mutate::bytes(rng, &idat.data, &[]);
            }
        }
        _ => {
            let bytes = png_bytes(&chunks, true);
            return mutate::truncate(rng, &bytes);
        }
    }
    png_bytes(&chunks, !rng.random_bool(0.05))
}

// --- JPEG -----------------------------------------------------------------------------------

/// A marker segment: (marker byte, payload without the length).
type Segment = (u8, Vec<u8>);

/// The segments up to and including SOS, then the entropy-coded rest.
fn jpeg_segments(data: &[u8]) -> Option<(Vec<Segment>, Vec<u8>)> {
    let mut rest = data.strip_prefix(&[0xFF, 0xD8])?;
    let mut segs = vec![];
    while rest.len() >= 4 && rest[0] == 0xFF {
        let m = rest[1];
        let n = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        if n < 2 || rest.len() < 2 + n {
            return None;
        }
        segs.push((m, rest[4..2 + n].to_vec()));
        rest = &rest[2 + n..];
        if m == 0xDA {
            return Some((segs, rest.to_vec()));
        }
    }
    None
}

fn jpeg_bytes(segs: &[Segment], scan: &[u8], lie: Option<u16>) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    for (i, (m, p)) in segs.iter().enumerate() {
        out.extend([0xFF, *m]);
        let n = (p.len() + 2) as u16;
        // One segment may claim a length that is not its own.
        let claimed = match lie {
            Some(l) if i == segs.len() / 2 => l,
            _ => n,
        };
        out.extend(claimed.to_be_bytes());
        out.extend(p);
    }
    out.extend(scan);
    out
}

fn mutate_jpeg(data: &[u8], rng: &mut FuzzRng) -> Vec<u8> {
    if rng.random_bool(0.15) {
        return extreme_shape(rng, ImageFormat::Jpeg);
    }
    let Some((mut segs, mut scan)) = jpeg_segments(data) else { return mutate::bytes(rng, data, &[0xFF, 0xD8]) };
    let mut lie = None;
    match rng.random_range(0..8) {
        // SOF0/SOF2: precision, height, width, component count
        0..=2 => {
            if let Some((_, p)) = segs.iter_mut().find(|(m, p)| matches!(m, 0xC0..=0xC2) && p.len() >= 6) {
                match rng.random_range(0..4) {
                    0 => p[0] = *mutate::pick(rng, &[0u8, 1, 8, 12, 16, 255]),
                    1 | 2 => {
                        let at = if rng.random_bool(0.5) { 1 } else { 3 };
                        let old = u16::from_be_bytes([p[at], p[at + 1]]);
                        let v = mutate::int_near(rng, old as i128) as u16;
                        p[at..at + 2].copy_from_slice(&v.to_be_bytes());
                    }
                    _ => p[5] = *mutate::pick(rng, &[0u8, 1, 2, 3, 4, 255]),
                }
            }
        }
        3 => lie = Some(*mutate::pick(rng, &[0u16, 1, 2, 3, 0x7FFF, 0xFFFF])),
        4 => {
            let i = rng.random_range(0..segs.len());
            segs.remove(i);
        }
        5 => {
            let i = rng.random_range(0..segs.len());
            let (m, p) = segs[i].clone();
            segs[i].1 = mutate::bytes(rng, &p, &[]);
            segs[i].0 = if rng.random_bool(0.2) { *mutate::pick(rng, &[0xC0u8, 0xC4, 0xDB, 0xDD, 0xE0]) } else { m };
        }
        // the scan cut short (a truncated download), or damaged
        6 => {
            let n = rng.random_range(0..=scan.len());
            scan.truncate(n);
        }
        _ => scan = mutate::bytes(rng, &scan, &[]),
    }
    jpeg_bytes(&segs, &scan, lie)
}

fn run_image(p: &Path) -> anyhow::Result<()> {
    let img = sage::image_io::load(p)?;
    // `classify` crops the centre; `map` keeps the whole image.
    sage::image_io::to_chw(&img, &sage::models::efficientnet::PREPROCESS);
    sage::image_io::to_chw(&img, &sage::models::efficientnet::PREPROCESS_FULL);
    Ok(())
}

pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "png",
            file_name: "image.png",
            seeds: png_seeds,
            mutate: mutate_png,
            setup: no_setup,
            run: run_image,
        },
        Target {
            name: "jpeg",
            file_name: "image.jpg",
            seeds: jpeg_seeds,
            mutate: mutate_jpeg,
            setup: no_setup,
            run: run_image,
        },
    ]
}
