//! The protobuf wire format, read-only and borrowed: enough to walk the few ONNX messages
//! [`super::onnx`] needs without a code generator. A message is a sequence of fields, each a
//! varint key (`field_number << 3 | wire_type`) followed by a varint, a fixed 4 or 8 bytes, or a
//! length-delimited byte string (nested messages, strings, packed repeated numbers).
//!
//! Every read checks the bounds first: a truncated or corrupt file gives a [`WireError`] saying
//! at which byte what was expected, never a panic or an out-of-range slice.

use std::fmt;

/// Where and why the bytes stopped making sense.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError {
    /// Byte offset from the start of the buffer the reader was given.
    pub at: usize,
    pub what: String,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {}: {}", self.at, self.what)
    }
}

impl std::error::Error for WireError {}

/// One field's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// A field: its number, its payload, and the payload's offset (for error messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field<'a> {
    pub number: u32,
    pub value: Value<'a>,
    pub at: usize,
}

impl<'a> Field<'a> {
    /// A length-delimited payload (a nested message, a string, a packed array).
    pub fn bytes(&self) -> Result<&'a [u8], WireError> {
        match self.value {
            Value::Bytes(b) => Ok(b),
            _ => Err(self.wrong("a length-delimited value")),
        }
    }

    pub fn varint(&self) -> Result<u64, WireError> {
        match self.value {
            Value::Varint(v) => Ok(v),
            _ => Err(self.wrong("a varint")),
        }
    }

    /// A UTF-8 string field.
    pub fn string(&self) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes()?)
            .map_err(|_| WireError { at: self.at, what: format!("field {} is not valid UTF-8", self.number) })
    }

    fn wrong(&self, expected: &str) -> WireError {
        WireError { at: self.at, what: format!("field {} should be {expected}, found {:?}", self.number, self.kind()) }
    }

    fn kind(&self) -> &'static str {
        match self.value {
            Value::Varint(_) => "a varint",
            Value::Fixed64(_) => "a fixed 64-bit value",
            Value::Bytes(_) => "a length-delimited value",
            Value::Fixed32(_) => "a fixed 32-bit value",
        }
    }

    /// A repeated int64/int32 field, packed (one byte string of varints) or not (this one
    /// varint); appends to `out`.
    pub fn push_varints(&self, out: &mut Vec<i64>) -> Result<(), WireError> {
        match self.value {
            Value::Varint(v) => out.push(v as i64),
            Value::Bytes(b) => {
                let mut pos = 0;
                while pos < b.len() {
                    let (v, next) = varint(b, pos).map_err(|e| WireError { at: self.at + e.at, what: e.what })?;
                    out.push(v as i64);
                    pos = next;
                }
            }
            _ => return Err(self.wrong("a varint or a packed array of varints")),
        }
        Ok(())
    }
}

/// Reads a varint starting at `pos`: `(value, position after it)`.
pub fn varint(buf: &[u8], mut pos: usize) -> Result<(u64, usize), WireError> {
    let start = pos;
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&b) = buf.get(pos) else {
            return Err(WireError { at: start, what: "the data ends inside a varint (truncated file?)".into() });
        };
        pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((v, pos));
        }
    }
    Err(WireError { at: start, what: "a varint longer than 10 bytes (corrupt data)".into() })
}

/// The fields of one message, in order. Yields `Err` once and then stops when the bytes are bad.
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` in the outermost buffer, so errors name an absolute byte.
    base: usize,
    failed: bool,
}

/// Iterates over the fields of a message held in `buf` (which starts at absolute offset `base`).
pub fn fields(buf: &[u8], base: usize) -> Fields<'_> {
    Fields { buf, pos: 0, base, failed: false }
}

impl<'a> Fields<'a> {
    fn next_field(&mut self) -> Result<Field<'a>, WireError> {
        let err = |at: usize, what: String| WireError { at, what };
        let buf: &'a [u8] = self.buf;
        let (key, pos) = varint(buf, self.pos).map_err(|e| err(self.base + e.at, e.what))?;
        let number = (key >> 3) as u32;
        if number == 0 {
            return Err(err(self.base + self.pos, "field number 0 (corrupt data)".into()));
        }
        let at = self.base + pos;
        let need = |n: usize| -> Result<&'a [u8], WireError> {
            buf.get(pos..pos.saturating_add(n)).ok_or_else(|| {
                err(at, format!("field {number} needs {n} bytes but the data ends sooner (truncated file?)"))
            })
        };
        let (value, next) = match key & 7 {
            0 => {
                let (v, next) = varint(buf, pos).map_err(|e| err(self.base + e.at, e.what))?;
                (Value::Varint(v), next)
            }
            1 => (Value::Fixed64(u64::from_le_bytes(need(8)?.try_into().expect("8 bytes"))), pos + 8),
            2 => {
                let (len, start) = varint(buf, pos).map_err(|e| err(self.base + e.at, e.what))?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let end = start.checked_add(len).filter(|&e| e <= buf.len()).ok_or_else(|| {
                    err(
                        at,
                        format!(
                            "field {number} says it holds {len} bytes but only {} remain (truncated file?)",
                            buf.len() - start.min(buf.len())
                        ),
                    )
                })?;
                return Ok(
                    self.advance(Field { number, value: Value::Bytes(&buf[start..end]), at: self.base + start }, end)
                );
            }
            5 => (Value::Fixed32(u32::from_le_bytes(need(4)?.try_into().expect("4 bytes"))), pos + 4),
            t => {
                return Err(err(
                    self.base + self.pos,
                    format!("unknown wire type {t} for field {number} (corrupt data)"),
                ))
            }
        };
        Ok(self.advance(Field { number, value, at }, next))
    }

    fn advance(&mut self, f: Field<'a>, next: usize) -> Field<'a> {
        self.pos = next;
        f
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let r = self.next_field();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
pub(crate) mod encode {
    //! A tiny writer for tests: builds messages field by field.

    pub fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    pub fn key(number: u32, wire: u8, out: &mut Vec<u8>) {
        varint(u64::from(number) << 3 | u64::from(wire), out);
    }

    pub fn int(number: u32, v: u64, out: &mut Vec<u8>) {
        key(number, 0, out);
        varint(v, out);
    }

    pub fn bytes(number: u32, b: &[u8], out: &mut Vec<u8>) {
        key(number, 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields_round_trip() {
        let mut m = Vec::new();
        encode::int(1, 300, &mut m);
        encode::bytes(2, b"abc", &mut m);
        encode::key(3, 5, &mut m);
        m.extend_from_slice(&1.5f32.to_le_bytes());
        let f: Vec<Field> = fields(&m, 0).collect::<Result<_, _>>().unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].varint().unwrap(), 300);
        assert_eq!(f[1].string().unwrap(), "abc");
        assert_eq!(f[2].value, Value::Fixed32(1.5f32.to_bits()));
        assert!(f[1].varint().unwrap_err().what.contains("should be a varint"));
    }

    #[test]
    fn packed_and_unpacked_repeated_ints() {
        let mut packed = Vec::new();
        for v in [1u64, 384, 14] {
            encode::varint(v, &mut packed);
        }
        let mut m = Vec::new();
        encode::bytes(1, &packed, &mut m);
        encode::int(1, 7, &mut m);
        let mut out = Vec::new();
        for f in fields(&m, 0) {
            f.unwrap().push_varints(&mut out).unwrap();
        }
        assert_eq!(out, [1, 384, 14, 7]);
    }

    #[test]
    fn truncation_is_an_error_at_the_right_byte() {
        let mut m = Vec::new();
        encode::bytes(2, &[0u8; 10], &mut m);
        // Cut inside the payload: the length says 10, 4 remain.
        let cut = &m[..6];
        let e = fields(cut, 100).next().unwrap().unwrap_err();
        assert!(e.what.contains("holds 10 bytes but only 4 remain"), "{e}");
        assert_eq!(e.at, 100 + 1);
        // Cut inside a varint.
        let e = varint(&[0x80, 0x80], 0).unwrap_err();
        assert!(e.what.contains("ends inside a varint"));
        // Every prefix of a valid message either parses or errors; none panics.
        let mut full = Vec::new();
        encode::int(1, u64::MAX, &mut full);
        encode::bytes(9, b"0123456789", &mut full);
        for n in 0..full.len() {
            let _ = fields(&full[..n], 0).collect::<Vec<_>>();
        }
        // An unknown wire type.
        assert!(fields(&[0x0b], 0).next().unwrap().unwrap_err().what.contains("wire type 3"));
    }
}
