//! Legacy `torch.save` checkpoints (`.pth`), written by a small pickle writer in exactly the
//! opcode style of the real EfficientNet-Lite0 asset (GLOBAL `collections OrderedDict`, BINPUT
//! memo, `_rebuild_tensor_v2` over persistent-id storages, SETITEMS, BUILD, then the storage key
//! list and the raw storages). The structure-aware mutator edits the model before writing it:
//! sizes, strides and offsets (0, negative, huge), storage classes and element counts, nesting
//! depth, zip instead of legacy; a second mode edits opcodes and their integer arguments.

use super::mutate::{self, FuzzRng};
use super::runner::{no_setup, Target};
use rand::Rng;
use std::path::Path;

const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;

#[derive(Clone)]
struct TensorDesc {
    name: String,
    key: String,
    class: String,
    offset: i128,
    size: Vec<i128>,
    stride: Vec<i128>,
}

#[derive(Clone)]
struct StorageDesc {
    key: String,
    numel: u64,
    data: Vec<u8>,
}

#[derive(Clone)]
struct Pth {
    tensors: Vec<TensorDesc>,
    storages: Vec<StorageDesc>,
    /// Extra list nesting around the first tensor's size tuple (0 = none).
    nesting: usize,
    zip: bool,
}

/// Pickle writer with a memo, like torch's.
struct W {
    out: Vec<u8>,
    memo: u32,
}

impl W {
    fn put(&mut self) {
        if self.memo < 256 {
            self.out.extend([b'q', self.memo as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend(self.memo.to_le_bytes());
        }
        self.memo += 1;
    }
    fn int(&mut self, v: i128) {
        if (0..256).contains(&v) {
            self.out.extend([b'K', v as u8]);
        } else if (256..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend((v as u16).to_le_bytes());
        } else if (i32::MIN as i128..=i32::MAX as i128).contains(&v) {
            self.out.push(b'J');
            self.out.extend((v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, as wide as needed
            let bytes = v.to_le_bytes();
            let mut n = 16;
            while n > 1
                && ((bytes[n - 1] == 0 && bytes[n - 2] & 0x80 == 0)
                    || (bytes[n - 1] == 0xff && bytes[n - 2] & 0x80 != 0))
            {
                n -= 1;
            }
            self.out.extend([0x8a, n as u8]);
            self.out.extend(&bytes[..n]);
        }
    }
    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
        self.put();
    }
    fn global(&mut self, m: &str, n: &str) {
        self.out.push(b'c');
        self.out.extend(format!("{m}\n{n}\n").as_bytes());
        self.put();
    }
    fn tuple(&mut self, xs: &[i128]) {
        self.out.push(b'(');
        xs.iter().for_each(|&x| self.int(x));
        self.out.push(b't');
        self.put();
    }
}

fn to_bytes(p: &Pth) -> Vec<u8> {
    if p.zip {
        // torch ≥ 1.6 writes a zip archive; the loader must refuse it cleanly.
        let mut b = b"PK\x03\x04".to_vec();
        b.extend(to_bytes(&Pth { zip: false, ..p.clone() }));
        return b;
    }
    let mut w = W { out: vec![], memo: 0 };
    // magic, protocol version, sys info
    w.out.extend([0x80, 2, 0x8a, 10]);
    w.out.extend(&LEGACY_MAGIC.to_le_bytes()[..10]);
    w.out.push(b'.');
    w.out.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']);
    w.out.extend([0x80, 2, b'}', b'q', 0, b'.']);
    // the state dict
    w.out.extend([0x80, 2]);
    w.memo = 0;
    w.global("collections", "OrderedDict");
    w.out.extend([b')', b'R']);
    w.put();
    w.out.push(b'(');
    for (i, t) in p.tensors.iter().enumerate() {
        w.str(&t.name);
        w.global("torch._utils", "_rebuild_tensor_v2");
        w.out.extend([b'(', b'(']);
        w.str("storage");
        w.global("torch", &t.class);
        w.str(&t.key);
        w.str("cpu");
        let numel = p.storages.iter().find(|s| s.key == t.key).map_or(0, |s| s.numel);
        w.int(numel as i128);
        w.out.extend([b'N', b't']);
        w.put();
        w.out.push(b'Q');
        w.int(t.offset);
        if i == 0 && p.nesting > 0 {
            // EMPTY_LIST n times, then APPEND n − 1 times: lists nested n deep
            w.out.extend(std::iter::repeat_n(b']', p.nesting));
            w.out.extend(std::iter::repeat_n(b'a', p.nesting - 1));
        } else {
            w.tuple(&t.size);
        }
        w.tuple(&t.stride);
        w.out.push(0x89);
        w.global("collections", "OrderedDict");
        w.out.extend([b')', b'R']);
        w.put();
        w.out.push(b't');
        w.put();
        w.out.push(b'R');
        w.put();
    }
    w.out.extend([b'u', b'}', b'b', b'.']);
    // storage keys, then storages
    w.out.extend([0x80, 2, b']']);
    w.memo = 0;
    w.put();
    w.out.push(b'(');
    for s in &p.storages {
        w.str(&s.key);
    }
    w.out.extend([b'e', b'.']);
    for s in &p.storages {
        w.out.extend(s.numel.to_le_bytes());
        w.out.extend(&s.data);
    }
    w.out
}

/// Contiguous strides of a row-major shape.
fn strides(size: &[i128]) -> Vec<i128> {
    let mut s = vec![1i128; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * size[i + 1];
    }
    s
}

/// A small state dict with the real checkpoint's names and kinds of tensors (conv weights,
/// BN statistics, a transposed linear weight, an integer counter).
fn base() -> Pth {
    let specs: &[(&str, &str, &[i128], bool)] = &[
        ("_conv_stem.weight", "FloatStorage", &[4, 3, 3, 3], false),
        ("_bn0.weight", "FloatStorage", &[4], false),
        ("_bn0.running_mean", "FloatStorage", &[4], false),
        ("_bn0.num_batches_tracked", "LongStorage", &[], false),
        ("_fc.weight", "FloatStorage", &[5, 4], true),
        ("_fc.bias", "HalfStorage", &[5], false),
    ];
    let mut tensors = vec![];
    let mut storages = vec![];
    for (i, (name, class, size, transposed)) in specs.iter().enumerate() {
        let key = format!("{}", 100125952 + i * 4096);
        let numel: i128 = size.iter().product();
        let elem = match *class {
            "LongStorage" => 8,
            "HalfStorage" => 2,
            _ => 4,
        };
        let data: Vec<u8> = (0..numel as usize * elem).map(|b| (b * 31 % 7) as u8).collect();
        let stride = if *transposed { vec![1, size[0]] } else { strides(size) };
        tensors.push(TensorDesc {
            name: name.to_string(),
            key: key.clone(),
            class: class.to_string(),
            offset: 0,
            size: size.to_vec(),
            stride,
        });
        storages.push(StorageDesc { key, numel: numel as u64, data });
    }
    Pth { tensors, storages, nesting: 0, zip: false }
}

fn seeds() -> Vec<Vec<u8>> {
    let b = base();
    // The same tensors sharing one storage at offsets, as torch writes views.
    let mut shared = b.clone();
    shared.tensors.truncate(3);
    shared.storages.truncate(1);
    shared.storages[0].numel = 108 + 8;
    shared.storages[0].data = vec![0u8; 116 * 4];
    for (i, t) in shared.tensors.iter_mut().enumerate() {
        t.key = shared.storages[0].key.clone();
        t.class = "FloatStorage".into();
        t.offset = if i == 0 { 0 } else { 104 + 4 * (i as i128 - 1) };
    }
    vec![to_bytes(&b), to_bytes(&shared)]
}

/// One to three edits of the base model.
fn mutate_model(rng: &mut FuzzRng) -> Pth {
    let mut p = base();
    for _ in 0..rng.random_range(1..=3) {
        edit_model(rng, &mut p);
    }
    p
}

fn edit_model(rng: &mut FuzzRng, p: &mut Pth) {
    let ti = rng.random_range(0..p.tensors.len());
    match rng.random_range(0..10) {
        0 | 1 => {
            let t = &mut p.tensors[ti];
            if !t.size.is_empty() {
                let d = rng.random_range(0..t.size.len());
                t.size[d] = mutate::int_near(rng, t.size[d]);
            } else {
                t.size.push(*mutate::pick(rng, &[-1i128, 0, 1 << 40]));
            }
        }
        2 => {
            let t = &mut p.tensors[ti];
            if !t.stride.is_empty() {
                let d = rng.random_range(0..t.stride.len());
                t.stride[d] = mutate::int_near(rng, t.stride[d]);
            }
        }
        3 => p.tensors[ti].offset = mutate::int_near(rng, 0),
        4 => {
            let si = rng.random_range(0..p.storages.len());
            let s = &mut p.storages[si];
            s.numel = mutate::int_near(rng, s.numel as i128) as u64;
        }
        5 => {
            p.tensors[ti].class =
                mutate::pick(rng, &["DoubleStorage", "BFloat16Storage", "IntStorage", "ByteStorage", "LongStorage"])
                    .to_string()
        }
        6 => p.nesting = *mutate::pick(rng, &[1usize, 2, 64, 10_000, 1_000_000]),
        7 => {
            // sizes and strides of different lengths
            let t = &mut p.tensors[ti];
            if rng.random_bool(0.5) {
                t.stride.pop();
            } else {
                t.size.push(1);
            }
        }
        8 => p.zip = true,
        _ => {
            // a tensor naming a storage that is not listed, or listed twice
            if rng.random_bool(0.5) {
                p.tensors[ti].key = "999".into();
            } else {
                let dup = p.storages[ti].clone();
                p.storages.push(dup);
            }
        }
    }
}

/// Replaces one opcode of the state-dict pickle with another the reader knows, or changes the
/// integer argument of one BININT1/BININT2/BININT.
fn mutate_opcodes(data: &[u8], rng: &mut FuzzRng) -> Vec<u8> {
    let mut d = data.to_vec();
    let region = d.len().min(1500);
    if region < 2 {
        return mutate::bytes(rng, data, &[]);
    }
    for _ in 0..8 {
        let i = rng.random_range(0..region - 1);
        match d[i] {
            b'K' => {
                d[i + 1] = *mutate::pick(rng, &[0u8, 1, 255, 128]);
                return d;
            }
            b'M' if i + 2 < d.len() => {
                d[i + 1..i + 3].copy_from_slice(&(*mutate::pick(rng, &[0u16, 1, 65535, 32768])).to_le_bytes());
                return d;
            }
            b'J' if i + 4 < d.len() => {
                d[i + 1..i + 5].copy_from_slice(&(*mutate::pick(rng, &[-1i32, i32::MIN, i32::MAX, 0])).to_le_bytes());
                return d;
            }
            b'(' | b't' | b'q' | b'h' | b'R' | b'Q' | b'u' | b's' | b'a' | b'e' | b'b' | b')' | b']' | b'}' => {
                d[i] = *mutate::pick(rng, b"(tqhRQusaeb)]}.NjrJKM\x85\x86\x87\x88\x89\x93\x94");
                return d;
            }
            _ => {}
        }
    }
    d
}

fn mutate(data: &[u8], rng: &mut FuzzRng) -> Vec<u8> {
    match rng.random_range(0..4) {
        0 => mutate_opcodes(data, rng),
        1 => mutate::truncate(rng, data),
        _ => to_bytes(&mutate_model(rng)),
    }
}

fn run(p: &Path) -> anyhow::Result<()> {
    let tensors = sage::formats::pth::load(p)?;
    for t in tensors.values() {
        t.f32s()?;
    }
    Ok(())
}

pub fn targets() -> Vec<Target> {
    vec![Target { name: "pth", file_name: "model.pth", seeds, mutate, setup: no_setup, run }]
}
