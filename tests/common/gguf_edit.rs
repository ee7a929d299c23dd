//! A small GGUF editor for tests: read a GGUF file, change or remove metadata entries and tensor
//! infos, and write it back with the header padded to the file's alignment.
//!
//! It is independent of the crate's own reader on purpose: a test that damages a file must not
//! depend on the code under test to build the damage.
//!
//! ```ignore
//! use common::gguf_edit::{GgufFile, Kv};
//! let mut g = GgufFile::read(&smollm2_gguf());
//! g.set("llama.attention.head_count", Kv::U32(7));   // replace (or append) a key
//! g.remove("llama.rope.freq_base");                  // drop a key
//! g.tensor_mut("blk.0.attn_q.weight").dims[1] = 64;  // dims are GGUF order (fastest first)
//! g.tensor_mut("blk.0.attn_k.weight").offset += 1;   // offsets are relative to the data section
//! g.write(&dir.join("bad.gguf"));
//! ```
//!
//! The tensor data section is kept byte for byte, so tensor offsets stay valid as long as the
//! alignment is unchanged; [`GgufFile::set`] on `general.alignment` changes only the header
//! padding, which is exactly what a test of misaligned offsets wants.
#![allow(dead_code)]

use std::path::Path;

/// A metadata value, tagged with its GGUF value type.
#[derive(Clone, Debug, PartialEq)]
pub enum Kv {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id (GGUF value type, e.g. 8 for strings) and the items.
    Array(u32, Vec<Kv>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Kv {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Kv::U8(_) => 0,
            Kv::I8(_) => 1,
            Kv::U16(_) => 2,
            Kv::I16(_) => 3,
            Kv::U32(_) => 4,
            Kv::I32(_) => 5,
            Kv::F32(_) => 6,
            Kv::Bool(_) => 7,
            Kv::Str(_) => 8,
            Kv::Array(..) => 9,
            Kv::U64(_) => 10,
            Kv::I64(_) => 11,
            Kv::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is one (any integer type, non-negative).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Kv::U8(v) => Some(v as u64),
            Kv::U16(v) => Some(v as u64),
            Kv::U32(v) => Some(v as u64),
            Kv::U64(v) => Some(v),
            Kv::I8(v) => u64::try_from(v).ok(),
            Kv::I16(v) => u64::try_from(v).ok(),
            Kv::I32(v) => u64::try_from(v).ok(),
            Kv::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    /// Dimensions as GGUF stores them: fastest-varying first (the reverse of row-major).
    pub dims: Vec<u64>,
    /// ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 14 Q6_K, 30 BF16, ...).
    pub ggml_type: u32,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
}

/// (elements per block, bytes per block) of the ggml types real files use.
pub fn ggml_block(ggml_type: u32) -> (u64, u64) {
    match ggml_type {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        8 => (32, 34),
        12 => (256, 144),
        14 => (256, 210),
        other => panic!("gguf_edit: ggml type {other} has no size here"),
    }
}

impl TensorEntry {
    /// Bytes of data its type and dimensions imply.
    pub fn n_bytes(&self) -> u64 {
        let (be, bb) = ggml_block(self.ggml_type);
        self.dims.iter().product::<u64>() / be * bb
    }
}

/// A whole GGUF file, decoded down to the tensor data (which is kept as raw bytes).
#[derive(Clone, Debug)]
pub struct GgufFile {
    pub version: u32,
    /// Metadata in file order.
    pub kv: Vec<(String, Kv)>,
    pub tensors: Vec<TensorEntry>,
    /// Everything from the (aligned) start of the data section to the end of the file.
    pub data: Vec<u8>,
}

const DEFAULT_ALIGNMENT: u64 = 32;

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).expect("GGUF strings are UTF-8")
    }
    fn value(&mut self, ty: u32) -> Kv {
        match ty {
            0 => Kv::U8(self.take(1)[0]),
            1 => Kv::I8(self.take(1)[0] as i8),
            2 => Kv::U16(u16::from_le_bytes(self.take(2).try_into().unwrap())),
            3 => Kv::I16(i16::from_le_bytes(self.take(2).try_into().unwrap())),
            4 => Kv::U32(self.u32()),
            5 => Kv::I32(self.u32() as i32),
            6 => Kv::F32(f32::from_bits(self.u32())),
            7 => Kv::Bool(self.take(1)[0] != 0),
            8 => Kv::Str(self.string()),
            9 => {
                let ety = self.u32();
                let n = self.u64() as usize;
                Kv::Array(ety, (0..n).map(|_| self.value(ety)).collect())
            }
            10 => Kv::U64(self.u64()),
            11 => Kv::I64(self.u64() as i64),
            12 => Kv::F64(f64::from_bits(self.u64())),
            other => panic!("gguf_edit: unknown value type {other}"),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Kv) {
    match v {
        Kv::U8(x) => out.push(*x),
        Kv::I8(x) => out.push(*x as u8),
        Kv::U16(x) => out.extend(x.to_le_bytes()),
        Kv::I16(x) => out.extend(x.to_le_bytes()),
        Kv::U32(x) => out.extend(x.to_le_bytes()),
        Kv::I32(x) => out.extend(x.to_le_bytes()),
        Kv::F32(x) => out.extend(x.to_le_bytes()),
        Kv::Bool(x) => out.push(*x as u8),
        Kv::Str(s) => put_str(out, s),
        Kv::Array(ety, items) => {
            out.extend(ety.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for it in items {
                assert_eq!(it.type_id(), *ety, "gguf_edit: array items must all have the element type");
                put_value(out, it);
            }
        }
        Kv::U64(x) => out.extend(x.to_le_bytes()),
        Kv::I64(x) => out.extend(x.to_le_bytes()),
        Kv::F64(x) => out.extend(x.to_le_bytes()),
    }
}

impl GgufFile {
    /// Reads and decodes a well-formed GGUF file (panics on a malformed one: this is a test tool).
    pub fn read(path: &Path) -> GgufFile {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("gguf_edit: reading {}: {e}", path.display()));
        Self::parse(&bytes)
    }

    /// Decodes a well-formed GGUF file held in memory.
    pub fn parse(bytes: &[u8]) -> GgufFile {
        let mut c = Cursor { b: bytes, pos: 0 };
        assert_eq!(c.take(4), b"GGUF", "gguf_edit: not a GGUF file");
        let version = c.u32();
        let n_tensors = c.u64();
        let n_kv = c.u64();
        let kv = (0..n_kv)
            .map(|_| {
                let key = c.string();
                let ty = c.u32();
                (key, c.value(ty))
            })
            .collect();
        let tensors = (0..n_tensors)
            .map(|_| {
                let name = c.string();
                let n_dims = c.u32();
                let dims = (0..n_dims).map(|_| c.u64()).collect();
                let ggml_type = c.u32();
                let offset = c.u64();
                TensorEntry { name, dims, ggml_type, offset }
            })
            .collect();
        let mut g = GgufFile { version, kv, tensors, data: Vec::new() };
        let start = (c.pos as u64).div_ceil(g.alignment()) * g.alignment();
        g.data = bytes[start as usize..].to_vec();
        g
    }

    /// `general.alignment`, or GGUF's default of 32.
    pub fn alignment(&self) -> u64 {
        self.get("general.alignment").and_then(Kv::as_u64).filter(|&a| a > 0).unwrap_or(DEFAULT_ALIGNMENT)
    }

    pub fn get(&self, key: &str) -> Option<&Kv> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Replaces the value of `key` in place, or appends the key when absent.
    pub fn set(&mut self, key: &str, value: Kv) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.kv.push((key.to_string(), value)),
        }
    }

    /// Removes `key`, returning its old value.
    pub fn remove(&mut self, key: &str) -> Option<Kv> {
        let i = self.kv.iter().position(|(k, _)| k == key)?;
        Some(self.kv.remove(i).1)
    }

    pub fn tensor(&self, name: &str) -> &TensorEntry {
        self.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("gguf_edit: no tensor {name}"))
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut TensorEntry {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("gguf_edit: no tensor {name}"))
    }

    /// Drops a tensor from the directory (its bytes stay in the data section).
    pub fn remove_tensor(&mut self, name: &str) -> TensorEntry {
        let i =
            self.tensors.iter().position(|t| t.name == name).unwrap_or_else(|| panic!("gguf_edit: no tensor {name}"));
        self.tensors.remove(i)
    }

    /// Drops a tensor from the directory and its bytes from the data section, moving the tensors
    /// after it down so the data stays packed (what a writer would have made without it).
    pub fn remove_tensor_and_data(&mut self, name: &str) -> TensorEntry {
        let gone = self.remove_tensor(name);
        let a = self.alignment();
        let mut order: Vec<usize> = (0..self.tensors.len()).collect();
        order.sort_by_key(|&i| self.tensors[i].offset);
        let mut data = Vec::with_capacity(self.data.len());
        for i in order {
            let t = &mut self.tensors[i];
            let (start, len) = (t.offset as usize, t.n_bytes() as usize);
            t.offset = data.len() as u64;
            data.extend_from_slice(&self.data[start..start + len]);
            data.resize(((data.len() as u64).div_ceil(a) * a) as usize, 0);
        }
        self.data = data;
        gone
    }

    /// Encodes the file: header, metadata, tensor directory, zero padding to the alignment, data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.ggml_type.to_le_bytes());
            out.extend(t.offset.to_le_bytes());
        }
        // A mutated alignment can be gigabytes: pad to it only when a reader could honour it
        // (the loader refuses more than 64 KiB), else to the default, which leaves the file as
        // invalid as the edit meant it to be without the writer allocating gigabytes.
        let a = Some(self.alignment()).filter(|&a| a <= 1 << 16).unwrap_or(DEFAULT_ALIGNMENT);
        out.resize(((out.len() as u64).div_ceil(a) * a) as usize, 0);
        out.extend(&self.data);
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).unwrap_or_else(|e| panic!("gguf_edit: writing {}: {e}", path.display()));
    }
}

/// Copies `src` to `dst` through `edit`: the one-liner most tests want.
pub fn edit_copy(src: &Path, dst: &Path, edit: impl FnOnce(&mut GgufFile)) {
    let mut g = GgufFile::read(src);
    edit(&mut g);
    g.write(dst);
}
