//! Hostile images: sizes and aspect ratios that would take gigabytes are refused from the header
//! before any pixel buffer is allocated, a truncated JPEG is refused (its decoder would fill the
//! rest with grey), and an output picture is never left half-written.
//!
//! `CARGO_BIN_EXE_sage=/path/to/sage` runs the CLI tests against another build (the build before
//! the fix fails them).

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// The `sage` binary as a plain command (the tests below wrap it in a shell for limits).
fn sage_bin() -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("sage"));
    c.env_remove("SAGE_THREADS");
    c
}

/// Runs `cmd`, expects exit 2 (the user's to fix) and returns stderr.
fn user_error(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "expected exit 2; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A decompression bomb: a PNG of a few kilobytes whose header declares `w × h` RGB pixels and
/// whose data is a valid zlib stream of zeros (the first rows), every CRC correct.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    chunk(&mut png, b"IHDR", &ihdr);
    // zlib: one stored block of zeros (filter byte 0 and black pixels), then the Adler-32.
    let zeros = vec![0u8; 4096];
    let mut z = vec![0x78, 0x01, 0x01];
    z.extend_from_slice(&(zeros.len() as u16).to_le_bytes());
    z.extend_from_slice(&(!(zeros.len() as u16)).to_le_bytes());
    z.extend_from_slice(&zeros);
    let (a, b) = zeros.iter().fold((1u32, 0u32), |(a, b), &x| ((a + x as u32) % 65521, (b + a + x as u32) % 65521));
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    chunk(&mut png, b"IDAT", &z);
    chunk(&mut png, b"IEND", &[]);
    png
}

fn write_png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 128])).save(path).unwrap();
}

#[test]
fn bomb_png_has_valid_crcs() {
    // The hand-built bomb is a real PNG: the image crate reads its header.
    let bomb = png_bomb(60000, 60000);
    assert!(bomb.len() < 5000);
    let r = image::ImageReader::new(std::io::Cursor::new(bomb)).with_guessed_format().unwrap();
    assert_eq!(r.into_dimensions().unwrap(), (60000, 60000));
}

#[test]
fn thin_png_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let thin = dir.path().join("thin.png");
    write_png(&thin, 1, 60000);
    let err = sage::image_io::load(&thin).unwrap_err();
    let s = format!("{err:#}");
    assert!(sage::error::is_user_error(&err));
    assert!(s.contains("thin.png") && s.contains("1×60000") && s.contains("SAGE_MAX_IMAGE_ASPECT"), "{s}");
    // A strip within the limit loads.
    let ok = dir.path().join("strip.png");
    write_png(&ok, 8, 256);
    assert_eq!(sage::image_io::load(&ok).unwrap().height(), 256);
}

#[test]
fn bomb_png_is_refused_from_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.png");
    std::fs::write(&bomb, png_bomb(60000, 60000)).unwrap();
    let s = format!("{:#}", sage::image_io::load(&bomb).unwrap_err());
    assert!(s.contains("bomb.png") && s.contains("3600000000 pixels") && s.contains("SAGE_MAX_IMAGE_PIXELS"), "{s}");
}

/// The classify command on the 1×60000 PNG and on the bomb: exit 2 at once, naming the limit,
/// with bounded memory (the build before the fix allocated gigabytes).
#[test]
fn cli_refuses_thin_and_bomb_images_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let thin = dir.path().join("thin.png");
    write_png(&thin, 1, 60000);
    let bomb = dir.path().join("bomb.png");
    std::fs::write(&bomb, png_bomb(60000, 60000)).unwrap();
    for (img, names) in [(&thin, "SAGE_MAX_IMAGE_ASPECT"), (&bomb, "SAGE_MAX_IMAGE_PIXELS")] {
        let t0 = std::time::Instant::now();
        // Bounded memory: 2 GiB of address space is far more than the refusal needs, and far less
        // than decoding and resizing either image takes.
        let err = user_error(
            Command::new("bash")
                .arg("-c")
                .arg("ulimit -v 2097152; exec \"$@\"")
                .arg("sage")
                .arg(sage_bin().get_program())
                .arg("classify")
                .arg(img),
        );
        assert!(err.contains(names), "{err}");
        assert!(t0.elapsed().as_secs() < 60, "took {:?}", t0.elapsed());
    }
    // The limit is raised by the variable it names.
    let err = user_error(sage_bin().env("SAGE_MAX_IMAGE_ASPECT", "0").arg("classify").arg(&thin));
    assert!(err.contains("SAGE_MAX_IMAGE_ASPECT") && err.contains("positive whole number"), "{err}");
}

fn jpeg_bytes() -> Vec<u8> {
    let img = image::RgbImage::from_fn(320, 240, |x, y| {
        image::Rgb([((x * 7 + y * 3) % 256) as u8, ((x ^ y) % 256) as u8, ((x * y) % 256) as u8])
    });
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Jpeg).unwrap();
    v
}

#[test]
fn truncated_jpeg_is_refused_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    let full = jpeg_bytes();
    let whole = dir.path().join("whole.jpg");
    std::fs::write(&whole, &full).unwrap();
    assert_eq!(sage::image_io::load(&whole).unwrap().width(), 320);
    for pct in [10, 30, 50, 70, 90, 99] {
        let cut = dir.path().join(format!("cut{pct}.jpg"));
        std::fs::write(&cut, &full[..full.len() * pct / 100]).unwrap();
        let err = sage::image_io::load(&cut).unwrap_err();
        let s = format!("{err:#}");
        assert!(sage::error::is_user_error(&err) && s.contains(&format!("cut{pct}.jpg")), "{s}");
        assert!(s.contains("corrupt or truncated"), "{s}");
    }
    // The last two bytes are the end-of-image marker: without them the decoder still succeeds,
    // the case a plain decode misses.
    let no_eoi = dir.path().join("no_eoi.jpg");
    std::fs::write(&no_eoi, &full[..full.len() - 2]).unwrap();
    let s = user_error(sage_bin().arg("classify").arg(&no_eoi));
    assert!(s.contains("no_eoi.jpg") && s.contains("SAGE_ALLOW_TRUNCATED_IMAGES"), "{s}");
    let limits = sage::image_io::ImageLimits { allow_truncated: true, ..Default::default() };
    assert!(sage::image_io::load_with(&no_eoi, &limits).is_ok(), "the variable lets it through");
}

/// `sage map --out` where the disk fills (a file-size limit stands in for it) keeps the previous
/// picture intact instead of truncating it.
#[test]
fn map_out_on_a_full_disk_keeps_the_previous_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("map.png");
    let test = test_image("chelsea.png");
    let ok = sage_bin().args(["map", "--test"]).arg(&test).arg("--out").arg(&out).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let good = std::fs::read(&out).unwrap();
    assert!(good.len() > 64 * 1024, "the map must outgrow the limit below: {} bytes", good.len());
    // 64 KiB per file; SIGXFSZ ignored, so a write past it fails with EFBIG as on a full disk.
    let failed = Command::new("bash")
        .arg("-c")
        .arg("ulimit -f 64; trap '' XFSZ; exec \"$@\"")
        .arg("sage")
        .arg(sage_bin().get_program())
        .args(["map", "--test"])
        .arg(&test)
        .arg("--reference")
        .arg(test_image("coffee.png"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!failed.status.success(), "the write must fail under the limit");
    let now = std::fs::read(&out).unwrap();
    assert!(now == good, "the previous map ({} bytes) was replaced by {} bytes", good.len(), now.len());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind: {leftovers:?}");
}
