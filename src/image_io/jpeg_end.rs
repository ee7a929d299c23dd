//! Whether a JPEG stream reaches its end-of-image marker. The JPEG decoder fills whatever a
//! truncated file lacks with grey and reports success, so completeness is checked here: the
//! marker segments are walked by their lengths (an EXIF thumbnail's own end marker sits inside
//! an APP1 segment and is skipped), entropy-coded data is scanned for the next marker, and the
//! stream is complete when EOI (`FF D9`) is reached. Bytes after EOI are allowed.

const EOI: u8 = 0xD9;
const SOI: [u8; 2] = [0xFF, 0xD8];

pub fn is_complete(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&SOI) {
        return false;
    }
    let mut i = SOI.len();
    loop {
        // The next marker: entropy-coded data and fill bytes come before it.
        while i < bytes.len() && bytes[i] != 0xFF {
            i += 1;
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = bytes.get(i) else { return false };
        i += 1;
        match marker {
            EOI => return true,
            // A stuffed 0xFF in entropy-coded data, a restart marker, TEM: no length follows.
            0x00 | 0x01 | 0xD0..=0xD7 => {}
            _ => {
                let Some(len) = bytes.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize) else {
                    return false;
                };
                if len < 2 || i + len > bytes.len() {
                    return false;
                }
                i += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_stream_passes_and_every_cut_fails() {
        let img = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 10) as u8, 90]));
        let mut jpeg = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        assert!(is_complete(&jpeg));
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(&[0, 0, 0]);
        assert!(is_complete(&trailing), "bytes after EOI are allowed");
        for cut in 0..jpeg.len() {
            assert!(!is_complete(&jpeg[..cut]), "cut at {cut} of {}", jpeg.len());
        }
    }
}
