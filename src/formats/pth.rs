//! The legacy (pre-1.6, non-zip) PyTorch `torch.save` format, read without Python.
//!
//! Layout: four pickles — magic number, protocol version, system info, then the object (here a
//! state dict whose tensors are `_rebuild_tensor_v2(storage, offset, size, stride, ...)` calls
//! with storages as persistent ids) — then a pickle listing the storage keys, then each storage's
//! raw bytes preceded by its element count as a little-endian u64. A small pickle VM covers the
//! opcodes `torch.save` emits (protocol 2); anything else is refused with its opcode.

use crate::tensor::Tensor;
use crate::user_err;
use anyhow::Result;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;

/// How deeply pickled values may nest. A state dict nests about six deep; the bound keeps every
/// recursive walk over a value (and its drop) far from the end of a thread's stack.
const MAX_DEPTH: usize = 100;

/// How many value nodes the memo may copy in all (it hands out copies, and a pickle that pushes a
/// memoised value into itself again and again doubles its size each time).
const MAX_COPIED_NODES: usize = 1 << 21;

#[derive(Clone, Debug, PartialEq)]
enum Val {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as its little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Tuple(Vec<Val>),
    List(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    Global(String, String),
    /// A callable applied to arguments (REDUCE/NEWOBJ), resolved after unpickling.
    Call(Box<Val>, Box<Val>),
    Persistent(Box<Val>),
    Mark,
}

struct Vm<'a> {
    buf: &'a [u8],
    pos: usize,
    /// What is left of [`MAX_COPIED_NODES`].
    copy_budget: usize,
}

/// The values a value holds directly.
fn children(v: &Val) -> Vec<&Val> {
    match v {
        Val::Tuple(xs) | Val::List(xs) => xs.iter().collect(),
        Val::Dict(kv) => kv.iter().flat_map(|(k, v)| [k, v]).collect(),
        Val::Call(f, a) => vec![&**f, &**a],
        Val::Persistent(p) => vec![&**p],
        _ => Vec::new(),
    }
}

/// How deeply `v` nests (a leaf is 0), or `None` when deeper than `room`: the walk stops there,
/// so it never recurses deeper than `room` itself.
fn nesting(v: &Val, room: usize) -> Option<usize> {
    let kids = children(v);
    if kids.is_empty() {
        return Some(0);
    }
    let room = room.checked_sub(1)?;
    let mut deepest = 0;
    for k in kids {
        deepest = deepest.max(nesting(k, room)?);
    }
    Some(deepest + 1)
}

/// Refuses a value about to be placed inside another if the result would nest too deeply.
fn check_nesting<'v>(items: impl IntoIterator<Item = &'v Val>) -> Result<(), String> {
    for v in items {
        if nesting(v, MAX_DEPTH - 1).is_none() {
            return Err(format!("the pickle nests values more than {MAX_DEPTH} deep"));
        }
    }
    Ok(())
}

/// Number of nodes in `v`, counting no further than `cap + 1`.
fn node_count(v: &Val, cap: usize) -> usize {
    let mut n = 1;
    for k in children(v) {
        if n > cap {
            break;
        }
        n += node_count(k, cap - n);
    }
    n
}

impl Vm<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!("the file ends early inside a pickle (offset {})", self.pos));
        }
        self.pos += n;
        Ok(&self.buf[self.pos - n..self.pos])
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String, String> {
        let start = self.pos;
        while self.u8()? != b'\n' {}
        Ok(String::from_utf8_lossy(&self.buf[start..self.pos - 1]).into_owned())
    }
    fn str_bytes(&mut self, n: usize) -> Result<String, String> {
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    /// A copy of `v` for the memo, charged to the copy budget.
    fn copy(&mut self, v: Option<&Val>, op: &str) -> Result<Val, String> {
        let v = v.ok_or_else(|| format!("{op} on an empty stack"))?;
        let n = node_count(v, self.copy_budget);
        if n > self.copy_budget {
            return Err(format!("the pickle copies more than {MAX_COPIED_NODES} values through its memo"));
        }
        self.copy_budget -= n;
        Ok(v.clone())
    }

    /// Runs one pickle to its STOP opcode and returns the top of the stack.
    fn load(&mut self) -> Result<Val, String> {
        let mut stack: Vec<Val> = Vec::new();
        let mut memo: HashMap<u32, Val> = HashMap::new();
        let pop_mark = |stack: &mut Vec<Val>| -> Result<Vec<Val>, String> {
            let m = stack.iter().rposition(|v| *v == Val::Mark).ok_or("MARK missing")?;
            let items = stack.split_off(m + 1);
            stack.pop();
            Ok(items)
        };
        let pop = |stack: &mut Vec<Val>| stack.pop().ok_or_else(|| "stack underflow".to_string());
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO n
                }
                b'.' => return pop(&mut stack),
                b'}' => stack.push(Val::Dict(vec![])),
                b']' => stack.push(Val::List(vec![])),
                b')' => stack.push(Val::Tuple(vec![])),
                b'(' => stack.push(Val::Mark),
                b'N' => stack.push(Val::None),
                0x88 => stack.push(Val::Bool(true)),
                0x89 => stack.push(Val::Bool(false)),
                b'J' => stack.push(Val::Int(self.u32()? as i32 as i64)),
                b'K' => stack.push(Val::Int(self.u8()? as i64)),
                b'M' => stack.push(Val::Int(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64)),
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        let big = b.to_vec();
                        stack.push(Val::BigInt(big));
                        continue;
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // sign-extend
                    }
                    stack.push(Val::Int(v));
                }
                b'G' => stack.push(Val::Float(f64::from_be_bytes(self.take(8)?.try_into().unwrap()))),
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.str_bytes(n)?;
                    stack.push(Val::Str(s));
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let s = self.str_bytes(n)?;
                    stack.push(Val::Str(s));
                }
                0x8c | b'U' => {
                    let n = self.u8()? as usize;
                    let s = self.str_bytes(n)?;
                    stack.push(Val::Str(s));
                }
                b'c' => {
                    let (m, n) = (self.line()?, self.line()?);
                    stack.push(Val::Global(m, n));
                }
                0x93 => {
                    let n = pop(&mut stack)?;
                    let m = pop(&mut stack)?;
                    match (m, n) {
                        (Val::Str(m), Val::Str(n)) => stack.push(Val::Global(m, n)),
                        _ => return Err("STACK_GLOBAL on non-strings".into()),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    memo.insert(i, self.copy(stack.last(), "BINPUT")?);
                }
                b'r' => {
                    let i = self.u32()?;
                    memo.insert(i, self.copy(stack.last(), "LONG_BINPUT")?);
                }
                0x94 => {
                    let i = memo.len() as u32;
                    memo.insert(i, self.copy(stack.last(), "MEMOIZE")?);
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    stack.push(self.copy(memo.get(&i), &format!("memo {i} missing:"))?);
                }
                b'j' => {
                    let i = self.u32()?;
                    stack.push(self.copy(memo.get(&i), &format!("memo {i} missing:"))?);
                }
                // Every opcode that puts values inside another checks how deep that nests.
                b't' => {
                    let items = pop_mark(&mut stack)?;
                    check_nesting(&items)?;
                    stack.push(Val::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if stack.len() < n {
                        return Err("stack underflow in TUPLEn".into());
                    }
                    let items = stack.split_off(stack.len() - n);
                    check_nesting(&items)?;
                    stack.push(Val::Tuple(items));
                }
                b'R' | 0x81 => {
                    let args = pop(&mut stack)?;
                    let f = pop(&mut stack)?;
                    check_nesting([&f, &args])?;
                    stack.push(Val::Call(Box::new(f), Box::new(args)));
                }
                b'b' => {
                    // BUILD: state applied to an object; state dicts only need the object.
                    pop(&mut stack)?;
                }
                b'Q' => {
                    let pid = pop(&mut stack)?;
                    check_nesting([&pid])?;
                    stack.push(Val::Persistent(Box::new(pid)));
                }
                b's' => {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    check_nesting([&k, &v])?;
                    dict_insert(stack.last_mut(), vec![k, v])?;
                }
                b'u' => {
                    let items = pop_mark(&mut stack)?;
                    check_nesting(&items)?;
                    dict_insert(stack.last_mut(), items)?;
                }
                b'a' => {
                    let v = pop(&mut stack)?;
                    check_nesting([&v])?;
                    match stack.last_mut() {
                        Some(Val::List(l)) => l.push(v),
                        _ => return Err("APPEND to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = pop_mark(&mut stack)?;
                    check_nesting(&items)?;
                    match stack.last_mut() {
                        Some(Val::List(l)) => l.extend(items),
                        _ => return Err("APPENDS to a non-list".into()),
                    }
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} at offset {}", self.pos - 1)),
            }
        }
    }
}

/// SETITEM(S) onto a dict, or onto `OrderedDict()` (a Call) by turning it into a dict.
fn dict_insert(target: Option<&mut Val>, items: Vec<Val>) -> Result<(), String> {
    let target = target.ok_or("SETITEMS on empty stack")?;
    if let Val::Call(f, _) = target {
        if matches!(&**f, Val::Global(m, n) if m == "collections" && n == "OrderedDict") {
            *target = Val::Dict(vec![]);
        }
    }
    match target {
        Val::Dict(d) => {
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                d.push((k, v));
            }
            Ok(())
        }
        _ => Err("SETITEMS on a non-dict".into()),
    }
}

/// Reads one little-endian element of a storage as f32.
type ElementReader = fn(&[u8]) -> f32;

/// Element size and converter for each storage class.
fn storage_kind(class: &str) -> Option<(usize, ElementReader)> {
    Some(match class {
        "FloatStorage" => (4, |b| f32::from_le_bytes(b.try_into().unwrap())),
        "DoubleStorage" => (8, |b| f64::from_le_bytes(b.try_into().unwrap()) as f32),
        "HalfStorage" => (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        "BFloat16Storage" => (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        "LongStorage" => (8, |b| i64::from_le_bytes(b.try_into().unwrap()) as f32),
        "IntStorage" => (4, |b| i32::from_le_bytes(b.try_into().unwrap()) as f32),
        _ => return None,
    })
}

/// Loads a legacy `.pth` state dict; every tensor is returned as contiguous f32.
pub fn load(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path)
        .map_err(|e| user_err!("cannot read {}: {e}; check the path or run `sage fetch`", path.display()))?;
    parse(&bytes).map_err(|msg| {
        user_err!(
            "{} is not a legacy PyTorch checkpoint sage can read: {msg}. Re-download it (`sage fetch --force`); zip-format (torch ≥ 1.6) files are not supported",
            path.display()
        )
    })
}

fn parse(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>, String> {
    if bytes.starts_with(b"PK\x03\x04") {
        return Err("it is a zip-format checkpoint".into());
    }
    let mut vm = Vm { buf: bytes, pos: 0, copy_budget: MAX_COPIED_NODES };
    match vm.load()? {
        Val::BigInt(b) if b.len() == 10 && b[..] == LEGACY_MAGIC.to_le_bytes()[..10] => {}
        _ => return Err("the legacy magic number is missing".into()),
    }
    vm.load()?; // protocol version
    vm.load()?; // sys info
    let root = vm.load()?;
    let keys = match vm.load()? {
        Val::List(k) => k,
        _ => return Err("the storage key list is missing".into()),
    };
    // Raw storages follow in key order.
    let mut storages: HashMap<String, Vec<f32>> = HashMap::new();
    let classes = storage_classes(&root);
    for key in keys {
        let Val::Str(key) = key else { return Err("a storage key is not a string".into()) };
        let n = u64::from_le_bytes(vm.take(8)?.try_into().unwrap()) as usize;
        let class = classes.get(&key).ok_or(format!("storage {key} is never referenced"))?;
        let (size, conv) = storage_kind(class).ok_or(format!("storage type {class} is not supported"))?;
        let raw = vm.take(n.checked_mul(size).ok_or("storage size overflows")?)?;
        storages.insert(key, raw.chunks_exact(size).map(conv).collect());
    }
    let Val::Dict(entries) = unwrap_ordered_dict(root) else { return Err("the checkpoint is not a state dict".into()) };
    let mut out = BTreeMap::new();
    for (k, v) in entries {
        let Val::Str(name) = k else { continue };
        out.insert(name.clone(), rebuild_tensor(&name, v, &storages)?);
    }
    Ok(out)
}

fn unwrap_ordered_dict(v: Val) -> Val {
    match v {
        Val::Call(f, _) if matches!(&*f, Val::Global(_, n) if n == "OrderedDict") => Val::Dict(vec![]),
        other => other,
    }
}

/// Maps storage key → storage class name, from every persistent id in the object.
fn storage_classes(v: &Val) -> HashMap<String, String> {
    let mut out = HashMap::new();
    fn walk(v: &Val, out: &mut HashMap<String, String>) {
        match v {
            Val::Persistent(pid) => {
                if let Val::Tuple(t) = &**pid {
                    if let (Some(Val::Global(_, class)), Some(Val::Str(key))) = (t.get(1), t.get(2)) {
                        out.insert(key.clone(), class.clone());
                    }
                }
            }
            Val::Tuple(xs) | Val::List(xs) => xs.iter().for_each(|x| walk(x, out)),
            Val::Dict(kv) => kv.iter().for_each(|(a, b)| {
                walk(a, out);
                walk(b, out)
            }),
            Val::Call(f, a) => {
                walk(f, out);
                walk(a, out)
            }
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

/// A tuple of non-negative integers (a size or a stride), or why it is not one.
fn dims(name: &str, what: &str, v: Option<&Val>) -> Result<Vec<usize>, String> {
    let bad = || format!("tensor {name}: its {what} is not a tuple of non-negative integers");
    let Some(Val::Tuple(xs)) = v else { return Err(bad()) };
    xs.iter()
        .map(|x| match x {
            Val::Int(i) => {
                usize::try_from(*i).map_err(|_| format!("tensor {name}: its {what} holds {i}, which is negative"))
            }
            _ => Err(bad()),
        })
        .collect()
}

fn rebuild_tensor(name: &str, v: Val, storages: &HashMap<String, Vec<f32>>) -> Result<Tensor, String> {
    let bad = || format!("entry {name} is not a tensor this reader can rebuild");
    let Val::Call(f, args) = v else { return Err(bad()) };
    if !matches!(&*f, Val::Global(_, n) if n == "_rebuild_tensor_v2" || n == "_rebuild_tensor") {
        return Err(bad());
    }
    let Val::Tuple(args) = *args else { return Err(bad()) };
    let key = match args.first() {
        Some(Val::Persistent(pid)) => match &**pid {
            Val::Tuple(t) => match t.get(2) {
                Some(Val::Str(k)) => k.clone(),
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    let offset = match args.get(1) {
        Some(Val::Int(o)) => {
            usize::try_from(*o).map_err(|_| format!("tensor {name}: its storage offset {o} is negative"))?
        }
        _ => return Err(bad()),
    };
    let size = dims(name, "size", args.get(2))?;
    let stride = dims(name, "stride", args.get(3))?;
    if stride.len() != size.len() {
        return Err(format!("tensor {name} has {} sizes but {} strides", size.len(), stride.len()));
    }
    let data = storages.get(&key).ok_or(format!("tensor {name} refers to missing storage {key}"))?;
    check_fits(name, offset, &size, &stride, data.len())?;
    let numel: usize = size.iter().product();
    // Gather through the strides (checkpoints converted from TensorFlow are not contiguous).
    let mut out = Vec::with_capacity(numel);
    let mut idx = vec![0usize; size.len()];
    for _ in 0..numel {
        let at = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(data[at]);
        for d in (0..size.len()).rev() {
            idx[d] += 1;
            if idx[d] < size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Tensor::from_vec(out, &size).map_err(|e| e.to_string())
}

/// A tensor must lie inside its storage, which lies inside the file: its last element
/// (`offset + Σ (size−1)·stride`) within the storage, and no more elements than the storage
/// holds. Checked before anything is allocated, so a hostile size is an error, not an abort.
fn check_fits(name: &str, offset: usize, size: &[usize], stride: &[usize], storage_len: usize) -> Result<(), String> {
    let too_big = || {
        format!("tensor {name} (size {size:?}, stride {stride:?}, offset {offset}) does not fit in its storage of {storage_len} elements")
    };
    let numel = size.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_big)?;
    if numel == 0 {
        return Ok(());
    }
    let last = size
        .iter()
        .zip(stride)
        .try_fold(offset, |at, (&n, &s)| (n - 1).checked_mul(s).and_then(|step| at.checked_add(step)))
        .ok_or_else(too_big)?;
    if last >= storage_len || numel > storage_len {
        return Err(too_big());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_zip_files_are_refused_with_reason() {
        assert!(parse(b"PK\x03\x04rest").unwrap_err().contains("zip"));
        assert!(parse(b"\x80\x02K\x05.").unwrap_err().contains("magic"));
        assert!(parse(b"\x80\x02\xff").unwrap_err().contains("opcode 0xff"));
        assert!(parse(b"\x80\x02X\x10\x00\x00\x00ab").unwrap_err().contains("ends early"));
    }
}
