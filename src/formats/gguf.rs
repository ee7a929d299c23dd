//! GGUF (v2/v3) reader: metadata, tensor directory and dequantisation to f32.
//!
//! Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K. Block layouts follow
//! ggml's `ggml-quants.c`. The file is memory-mapped; a tensor is dequantised when asked for.

use crate::quant::{self, QMatrix, QType};
use crate::tensor::Tensor;
use crate::user_err;
use anyhow::{Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Larger alignments than this are not paddings any writer uses.
const MAX_ALIGNMENT: u64 = 1 << 16;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader understands: plain floats, or a quantized block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Quant(QType),
}

impl GgmlType {
    fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Quant(QType::Q4_0),
            3 => GgmlType::Quant(QType::Q4_1),
            6 => GgmlType::Quant(QType::Q5_0),
            7 => GgmlType::Quant(QType::Q5_1),
            8 => GgmlType::Quant(QType::Q8_0),
            12 => GgmlType::Quant(QType::Q4K),
            13 => GgmlType::Quant(QType::Q5K),
            14 => GgmlType::Quant(QType::Q6K),
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The block type of a quantized type (`None` for F32, F16, BF16).
    pub fn quant(self) -> Option<QType> {
        match self {
            GgmlType::Quant(q) => Some(q),
            _ => None,
        }
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Quant(q) => (q.block_len(), q.block_bytes()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (GGUF stores dimensions fastest-first; this is reversed).
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    mmap: Mmap,
}

/// A cursor over the header that turns every short read into a "truncated" error.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len().saturating_sub(self.pos) < n {
            return Err(format!(
                "the header ends early (needed {n} bytes at offset {}, file has {})",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len(&mut self, what: &str) -> Result<usize, String> {
        let n = self.u64()?;
        // Any length larger than the file cannot be honest.
        if n > self.buf.len() as u64 {
            return Err(format!("{what} length {n} exceeds the file size {}", self.buf.len()));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.len("string")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("a string at offset {} is not UTF-8", self.pos - n))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.take(1)?[0]),
            1 => Value::I8(self.take(1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("arrays nested too deeply".into());
                }
                let ety = self.u32()?;
                let n = self.len("array")?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(ety, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => return Err(format!("unknown metadata value type {other} at offset {}", self.pos - 4)),
        })
    }
}

/// `general.alignment`: absent means GGUF's default; present, it must be a power of two (ggml
/// pads with a mask) and small enough to be a padding, not a hole.
fn alignment(metadata: &BTreeMap<String, Value>) -> Result<u64, String> {
    let Some(v) = metadata.get("general.alignment") else { return Ok(DEFAULT_ALIGNMENT) };
    match v.as_u64() {
        Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => Ok(a),
        _ => Err(format!("general.alignment is {v:?}; expected a power of two from 1 to {MAX_ALIGNMENT}")),
    }
}

/// The tensors must tile the data section as GGUF writers lay it out: in offset order, each
/// starting at the previous one's end rounded up to the alignment, the last one ending the file.
/// A tensor whose type or shape contradicts its data shows up here as an overlap (too many bytes)
/// or a gap (too few), so this is also the check of type against size.
fn check_tiling(
    tensors: &BTreeMap<String, TensorInfo>,
    data_start: usize,
    alignment: usize,
    file_len: usize,
) -> Result<(), String> {
    let mut by_offset: Vec<&TensorInfo> = tensors.values().collect();
    by_offset.sort_by_key(|t| (t.offset, t.name.as_str()));
    let mut expected = data_start;
    let mut previous: Option<&TensorInfo> = None;
    for t in by_offset {
        if t.offset != expected {
            let rel = |x: usize| x - data_start;
            return Err(match previous {
                Some(p) if t.offset < expected => format!(
                    "tensor {} (data offset {}) overlaps tensor {} (data offset {}, {} bytes of type {:?}): offsets must be disjoint, and each tensor's type and shape must match its bytes",
                    t.name, rel(t.offset), p.name, rel(p.offset), p.n_bytes, p.ggml_type
                ),
                Some(p) => format!(
                    "tensor {} starts at data offset {}, but tensor {} before it ends at {} (padded to {alignment}): {} bytes belong to no tensor; a type or shape does not match the data",
                    t.name, rel(t.offset), p.name, rel(expected), t.offset - expected
                ),
                None => format!(
                    "the first tensor, {}, starts at data offset {}, not 0: {} bytes belong to no tensor",
                    t.name, rel(t.offset), rel(t.offset)
                ),
            });
        }
        expected = (t.offset + t.n_bytes).div_ceil(alignment) * alignment;
        previous = Some(t);
    }
    // The last tensor may end the file unpadded; anything longer than its padding is data no
    // tensor owns (e.g. the last tensor's type claims fewer bytes than were written).
    if let Some(p) = previous {
        if file_len > expected {
            return Err(format!(
                "{} bytes after the last tensor ({}, {} bytes of type {:?}) belong to no tensor; its type or shape does not match the data",
                file_len - expected, p.name, p.n_bytes, p.ggml_type
            ));
        }
    }
    Ok(())
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = std::fs::File::open(path).map_err(|e| {
            user_err!("cannot open GGUF file {}: {e}; check the path or run `sage fetch`", path.display())
        })?;
        // SAFETY: the mapping is read-only; a file changed underneath us would be a user error we
        // cannot detect, as with every mmap-based reader.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        Self::parse(path, mmap).map_err(|msg| {
            user_err!(
                "{} is not a valid GGUF file: {msg}. Re-download it (`sage fetch --force`) or point to another file",
                path.display()
            )
        })
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Gguf, String> {
        let mut r = Reader { buf: &mmap, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err("it does not start with the GGUF magic".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("version {version} is not supported (2 and 3 are)"));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        if n_tensors > 1 << 24 || n_kv > 1 << 24 {
            return Err(format!("implausible counts ({n_tensors} tensors, {n_kv} metadata keys)"));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            // A second value for a key would silently win; which one the writer meant is unknowable.
            if metadata.insert(key.clone(), v).is_some() {
                return Err(format!("metadata key `{key}` appears twice"));
            }
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 4 {
                return Err(format!("tensor {name} has {n_dims} dimensions (max 4)"));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64()? as usize);
            }
            let tid = r.u32()?;
            let ty = GgmlType::from_id(tid).ok_or_else(|| format!("tensor {name} has ggml type {tid}, which this reader does not support (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)"))?;
            let offset = r.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let alignment = alignment(&metadata)?;
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in infos {
            let numel: usize = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| format!("tensor {name} is impossibly large"))?;
            let (be, bb) = ty.block();
            // ggml quantises row by row: a block never spans two rows.
            let row = dims.first().copied().unwrap_or(1);
            if row % be != 0 {
                return Err(format!(
                    "tensor {name} has rows of {row} elements, not a multiple of the {be}-element blocks of its type {ty:?}"
                ));
            }
            if offset % alignment != 0 {
                return Err(format!(
                    "tensor {name} starts at data offset {offset}, which is not a multiple of the alignment {alignment} (general.alignment)"
                ));
            }
            let n_bytes = numel / be * bb;
            let abs = data_start.checked_add(offset).ok_or("tensor offset overflows")? as usize;
            if abs.checked_add(n_bytes).is_none_or(|end| end > mmap.len()) {
                return Err(format!(
                    "tensor {name} needs bytes {abs}..{} but the file has {} (truncated download?)",
                    abs.saturating_add(n_bytes),
                    mmap.len()
                ));
            }
            let shape = dims.iter().rev().copied().collect();
            let info = TensorInfo { name: name.clone(), shape, ggml_type: ty, offset: abs, n_bytes };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(format!("tensor {name} appears twice in the tensor directory"));
            }
        }
        check_tiling(&tensors, data_start as usize, alignment as usize, mmap.len())?;
        Ok(Gguf { path: path.to_path_buf(), version, metadata, tensors, mmap })
    }

    pub fn meta(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| user_err!("{}: metadata key `{key}` is missing", self.path.display()))
    }

    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key)?
            .as_u64()
            .ok_or_else(|| user_err!("{}: metadata key `{key}` is not a non-negative integer", self.path.display()))
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta(key)?
            .as_f64()
            .ok_or_else(|| user_err!("{}: metadata key `{key}` is not a number", self.path.display()))
    }

    /// An optional integer key: absent is `None`, present but not a non-negative integer is an error
    /// (a default must never stand in for a value the file states wrongly).
    pub fn meta_u64_opt(&self, key: &str) -> Result<Option<u64>> {
        self.metadata.get(key).map(|_| self.meta_u64(key)).transpose()
    }

    /// An optional number key, as [`Gguf::meta_u64_opt`].
    pub fn meta_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.metadata.get(key).map(|_| self.meta_f64(key)).transpose()
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)?
            .as_str()
            .ok_or_else(|| user_err!("{}: metadata key `{key}` is not a string", self.path.display()))
    }

    /// A 2-D tensor's quantized blocks as they are in the file (`None` for an unquantized or
    /// absent tensor): what inference from the blocks multiplies with.
    pub fn quantized(&self, name: &str) -> Option<QMatrix> {
        let info = self.tensors.get(name)?;
        let ty = info.ggml_type.quant()?;
        let [rows, cols] = info.shape[..] else { return None };
        let bytes: std::sync::Arc<[u8]> = self.mmap[info.offset..info.offset + info.n_bytes].into();
        QMatrix::new(ty, rows, cols, bytes).ok()
    }

    /// Reads and dequantises a tensor to f32.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| {
            user_err!("{}: tensor `{name}` is missing (is this the right architecture?)", self.path.display())
        })?;
        let bytes = &self.mmap[info.offset..info.offset + info.n_bytes];
        let data = dequantize(info.ggml_type, bytes);
        Tensor::from_vec(data, &info.shape)
    }
}

/// Dequantises a whole buffer of `ty` blocks to f32 (the block types in `crate::quant`).
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        GgmlType::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        GgmlType::Quant(q) => quant::dequantize(q, bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_and_q4_blocks_dequantise_by_hand() {
        let mut b = f16b(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = dequantize(GgmlType::Quant(QType::Q8_0), &b);
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);

        // Q4_1: d = 2, m = -1; byte j holds element j (low nibble) and j + 16 (high nibble).
        let mut b = [f16b(2.0), f16b(-1.0)].concat();
        b.extend((0..16u8).map(|j| (j % 16) | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Quant(QType::Q4_1), &b);
        assert_eq!(y[0], -1.0);
        assert_eq!(y[5], 9.0);
        assert_eq!(y[16], 29.0);

        // Q4_0: x = (q − 8) · d.
        let mut b = f16b(1.0).to_vec();
        b.extend([0x8Fu8; 16]);
        let y = dequantize(GgmlType::Quant(QType::Q4_0), &b);
        assert_eq!((y[0], y[16]), (7.0, 0.0));
    }

    #[test]
    fn q4_k_and_q6_k_blocks_dequantise_by_hand() {
        // Q4_K: all 6-bit scales 1 and mins 0 for the first four sub-blocks (j < 4 path), and
        // scale 2 / min 1 for the others (j ≥ 4 path, packed in bytes 8..12).
        let mut scales = [0u8; 12];
        scales[..4].fill(1); // sc j<4
        scales[4..8].fill(0); // m j<4
        scales[8..12].fill(0x12); // low nibble 2 = sc, high nibble 1 = m for j ≥ 4
        let mut b = [f16b(1.0), f16b(1.0)].concat();
        b.extend(scales);
        b.extend([0x53u8; 128]); // low nibble 3, high nibble 5
        let y = dequantize(GgmlType::Quant(QType::Q4K), &b);
        assert_eq!(y[0], 3.0); // sub-block 0: 1·3 − 0
        assert_eq!(y[32], 5.0); // sub-block 1: 1·5 − 0
        assert_eq!(y[128], 2.0 * 3.0 - 1.0); // sub-block 4
        assert_eq!(y[160], 2.0 * 5.0 - 1.0); // sub-block 5

        // Q6_K: ql = 0x21, qh = 0 → q1 = 1 − 32, q3 = 2 − 32; scales 1..16; d = 0.5.
        let mut b = vec![0x21u8; 128];
        b.extend([0u8; 64]);
        b.extend((1..=16u8).collect::<Vec<_>>());
        b.extend(f16b(0.5));
        let y = dequantize(GgmlType::Quant(QType::Q6K), &b);
        assert_eq!(y[0], 0.5 * 1.0 * -31.0);
        assert_eq!(y[64], 0.5 * 5.0 * -30.0);
        assert_eq!(y[128], 0.5 * 9.0 * -31.0);
    }

    /// Every quantised type against the `gguf` Python package's numpy dequantisation of the same
    /// random blocks (tests/fixtures/gguf/quants.json, written by scripts/gguf_quants_reference.py).
    #[test]
    fn quantised_blocks_match_gguf_py() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/gguf/quants.json")).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 8);
        for case in cases {
            let ty = match case["type"].as_str().unwrap() {
                "Q4_0" => GgmlType::Quant(QType::Q4_0),
                "Q4_1" => GgmlType::Quant(QType::Q4_1),
                "Q5_0" => GgmlType::Quant(QType::Q5_0),
                "Q5_1" => GgmlType::Quant(QType::Q5_1),
                "Q8_0" => GgmlType::Quant(QType::Q8_0),
                "Q4_K" => GgmlType::Quant(QType::Q4K),
                "Q5_K" => GgmlType::Quant(QType::Q5K),
                "Q6_K" => GgmlType::Quant(QType::Q6K),
                other => panic!("unexpected type {other}"),
            };
            let hex = case["bytes"].as_str().unwrap();
            let bytes: Vec<u8> =
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            let want: Vec<f32> =
                case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let got = dequantize(ty, &bytes);
            assert_eq!(got.len(), want.len(), "{ty:?}");
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-6 * scale, "{ty:?} element {i}: {g} vs gguf-py {w}");
            }
        }
    }
}
