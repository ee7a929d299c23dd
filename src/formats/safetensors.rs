//! safetensors read (memory-mapped, validated) and atomic write, via the `safetensors` crate.

use crate::tensor::{DType, Storage, Tensor};
use crate::user_err;
use anyhow::{Context, Result};
use memmap2::Mmap;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A memory-mapped safetensors file whose header has been checked against the file size.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| {
            user_err!("cannot open safetensors file {}: {e}; check the path or run `sage fetch`", path.display())
        })?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        // The crate checks that offsets are in range, disjoint and tile the data without holes, and
        // that each span is its shape × dtype; alignment is checked here.
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            user_err!("{} is not a valid safetensors file: {e}. The header does not match the data; re-download or re-export it", path.display())
        })?;
        let data_start = 8 + header_len;
        for (name, info) in metadata.tensors() {
            let align = (info.dtype.bitsize() / 8).max(1);
            let at = data_start + info.data_offsets.0;
            if at % align != 0 {
                return Err(user_err!(
                    "{} is not a valid safetensors file: tensor `{name}` ({:?}) starts at byte {at}, not a multiple of its {align}-byte element size. Re-export it with the safetensors library, which aligns every tensor",
                    path.display(),
                    info.dtype
                ));
            }
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap })
    }

    /// A tensor's shape from the header, `None` when absent.
    pub fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.view().tensor(name).ok().map(|v| v.shape().to_vec())
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("validated in open")
    }

    pub fn names(&self) -> Vec<String> {
        self.view().names().into_iter().map(str::to_owned).collect()
    }

    /// Reads a tensor as f32 (F32, F16 and BF16 are accepted).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let st = self.view();
        let v = st
            .tensor(name)
            .map_err(|_| user_err!("{}: tensor `{name}` is missing (is this the right model?)", self.path.display()))?;
        let data = v.data();
        let storage = match v.dtype() {
            Dtype::F32 => {
                Storage::F32(data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
            }
            Dtype::F16 => Storage::F16(data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect()),
            Dtype::BF16 => {
                Storage::BF16(data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect())
            }
            other => {
                return Err(user_err!(
                    "{}: tensor `{name}` has dtype {other:?}; sage reads F32, F16 and BF16",
                    self.path.display()
                ))
            }
        };
        Ok(Tensor::from_storage(storage, v.shape())?.to_dtype(DType::F32))
    }
}

/// Writes tensors (in their storage dtype) to `path` atomically.
pub fn write(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (Dtype::F32, t.f32s()?.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
            d => {
                let wide = t.to_dtype(DType::F32);
                let vals = wide.f32s()?;
                match d {
                    DType::F16 => {
                        (Dtype::F16, vals.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect())
                    }
                    _ => (Dtype::BF16, vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()),
                }
            }
        };
        bufs.push((name.clone(), dtype, t.shape().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let bytes = safetensors::serialize(views, metadata).context("serialising safetensors")?;
    crate::util::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips_and_lying_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let mut m = BTreeMap::new();
        m.insert("a".to_string(), Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap());
        m.insert("b".to_string(), Tensor::from_vec(vec![0.5; 3], &[3]).unwrap().to_dtype(DType::BF16));
        write(&p, &m, None).unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.tensor("a").unwrap().f32s().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(f.tensor("b").unwrap().f32s().unwrap(), &[0.5; 3]);
        assert!(f.tensor("c").is_err());

        // Claim more data than the file holds.
        let bytes = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap().replace("[0,16]", "[0,1600]");
        let mut bad = (header.len() as u64).to_le_bytes().to_vec();
        bad.extend(header.as_bytes());
        bad.extend(&bytes[8 + n..]);
        let q = dir.path().join("bad.safetensors");
        std::fs::write(&q, bad).unwrap();
        let err = SafetensorsFile::open(&q).err().expect("lying header must be refused");
        assert!(crate::error::is_user_error(&err));
        assert!(err.to_string().contains("bad.safetensors"), "{err}");
    }
}
