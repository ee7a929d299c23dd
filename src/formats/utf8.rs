//! Incremental UTF-8 decoding of a byte stream that arrives in pieces (a byte-level BPE model's
//! tokens: one character's bytes may be split across tokens, and a model may emit bytes that
//! never form a character).

/// Turns bytes pushed in pieces into text: a character split across pieces comes out whole,
/// once, with the piece that completes it; an incomplete sequence at the end of a piece is held
/// back until the next one. Bytes that cannot be part of any character (a lead byte whose
/// continuation never comes, a stray continuation byte, an overlong or surrogate encoding) are
/// dropped instead of replaced by U+FFFD: what comes out is only the characters the bytes hold.
/// The invalid sequences are recognised as [`std::str::from_utf8`] does (`Utf8Error::error_len`,
/// the "maximal subpart" rule of `String::from_utf8_lossy`), so pushing the bytes in any pieces
/// gives the same text as pushing them at once.
#[derive(Clone, Debug, Default)]
pub struct Utf8Stream {
    /// The bytes of an incomplete character at the end of what was pushed (at most 3).
    pending: Vec<u8>,
    /// How many bytes were dropped so far.
    dropped: usize,
}

impl Utf8Stream {
    pub fn new() -> Utf8Stream {
        Utf8Stream::default()
    }

    /// Appends `bytes` and returns the text they complete (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut out = String::new();
        self.push_into(bytes, &mut out);
        out
    }

    /// [`Utf8Stream::push`], appending the completed text to `out`.
    pub fn push_into(&mut self, bytes: &[u8], out: &mut String) {
        self.pending.extend_from_slice(bytes);
        let mut rest = &self.pending[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).expect("valid_up_to bytes are UTF-8"));
                    match e.error_len() {
                        Some(n) => {
                            self.dropped += n;
                            rest = &after[n..];
                        }
                        // An incomplete character at the end: wait for its other bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.drain(..start);
    }

    /// Ends the stream: an incomplete character still held back is dropped. Returns how many
    /// bytes were dropped over the whole stream (0 when the bytes were valid UTF-8).
    pub fn finish(&mut self) -> usize {
        self.dropped += self.pending.len();
        self.pending.clear();
        self.dropped
    }

    /// Bytes held back, waiting for the rest of their character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// `bytes` as text with what cannot be decoded dropped (pushed at once, then finished).
    pub fn decode_dropping_invalid(bytes: &[u8]) -> String {
        let mut s = Utf8Stream::new();
        let text = s.push(bytes);
        s.finish();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `bytes` in pieces cut at `cuts` and returns each push's output and the whole text.
    fn pushed(bytes: &[u8], cuts: &[usize]) -> (Vec<String>, String) {
        let mut s = Utf8Stream::new();
        let mut pieces = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain([&bytes.len()]) {
            pieces.push(s.push(&bytes[at..c]));
            at = c;
        }
        s.finish();
        let whole = pieces.concat();
        (pieces, whole)
    }

    #[test]
    fn a_character_split_at_any_byte_comes_out_whole_once() {
        for ch in ["é", "—", "’", "🙂"] {
            let text = format!("a{ch}b");
            let bytes = text.as_bytes();
            // Every way of cutting the character's bytes into two pieces, and into single bytes.
            for cut in 2..bytes.len() - 1 {
                let (pieces, whole) = pushed(bytes, &[1, cut]);
                assert_eq!(whole, text, "{ch} cut at byte {cut}");
                assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
                // The piece that completes the character carries it; none before it does.
                assert_eq!(pieces.iter().filter(|p| p.contains(ch)).count(), 1, "{ch} cut at {cut}: {pieces:?}");
                assert_eq!(pieces[1], "", "{ch} cut at {cut}: the first part is held back");
                assert_eq!(pieces[2], format!("{ch}b"));
            }
            let singles: Vec<usize> = (1..bytes.len()).collect();
            let (pieces, whole) = pushed(bytes, &singles);
            assert_eq!(whole, text);
            let n = ch.len();
            assert_eq!(pieces[n], ch, "{ch} byte by byte: {pieces:?}");
            assert!(pieces[1..n].iter().all(String::is_empty));
        }
    }

    #[test]
    fn held_back_bytes_wait_for_the_next_push() {
        let mut s = Utf8Stream::new();
        assert_eq!(s.push("x🙂".as_bytes().split_at(3).0), "x");
        assert_eq!(s.pending(), &"🙂".as_bytes()[..2]);
        assert_eq!(s.push(&"🙂".as_bytes()[2..3]), "");
        assert_eq!(s.push(&"🙂".as_bytes()[3..]), "🙂");
        assert!(s.pending().is_empty());
        assert_eq!(s.finish(), 0);
    }

    #[test]
    fn bytes_that_form_no_character_are_dropped() {
        // "are" + the first two bytes of "—" (E2 80 94) + " the": the lead bytes never complete.
        let mut bytes = b"are".to_vec();
        bytes.extend_from_slice(&[0xE2, 0x80]);
        bytes.extend_from_slice(b" the");
        assert_eq!(String::from_utf8_lossy(&bytes), "are\u{FFFD} the");
        assert_eq!(Utf8Stream::decode_dropping_invalid(&bytes), "are the");
        // Two incomplete sequences in a row, a stray continuation byte, an overlong encoding of
        // '/', a surrogate, and 0xFF.
        for (bad, lossy) in [
            (&[0xE2, 0x80, 0xE2, 0x80][..], 2),
            (&[0x94][..], 1),
            (&[0xC0, 0xAF][..], 2),
            (&[0xED, 0xA0, 0x80][..], 3),
            (&[0xFF][..], 1),
        ] {
            let mut bytes = b"ok ".to_vec();
            bytes.extend_from_slice(bad);
            bytes.extend_from_slice("é.".as_bytes());
            assert_eq!(String::from_utf8_lossy(&bytes).matches('\u{FFFD}').count(), lossy, "{bad:x?}");
            let mut s = Utf8Stream::new();
            assert_eq!(s.push(&bytes), "ok é.", "{bad:x?}");
            assert_eq!(s.finish(), bad.len(), "{bad:x?}");
        }
        // A lead byte at the very end is held, then dropped by `finish`.
        let mut s = Utf8Stream::new();
        assert_eq!(s.push(&[b'a', 0xF0, 0x9F]), "a");
        assert_eq!(s.finish(), 2);
        assert_eq!(s.push(b"b"), "b");
    }

    #[test]
    fn pieces_give_the_same_text_as_the_whole() {
        // Valid and invalid bytes mixed, cut at every pair of places.
        let mut bytes = "é—🙂 x".as_bytes().to_vec();
        bytes.extend_from_slice(&[0xE2, 0x80, b' ', 0xF0, 0x9F, 0x99, 0x82, 0x80, 0xE2]);
        bytes.extend_from_slice("’s".as_bytes());
        let whole = Utf8Stream::decode_dropping_invalid(&bytes);
        assert_eq!(whole, "é—🙂 x 🙂’s");
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                assert_eq!(pushed(&bytes, &[i, j]).1, whole, "cut at {i}, {j}");
            }
        }
    }
}
