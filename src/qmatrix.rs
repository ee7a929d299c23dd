//! A matrix of ggml's quantized blocks and the block types: the data that the op set uploads
//! (`opset::QuantOps`) and the `quant` kernels read. A leaf of the crate, so that the op set's
//! interface does not import the kernels' module; their dequantisation is `quant::blocks`.

use std::sync::Arc;

/// A quantized block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QType {
    pub const ALL: [QType; 8] =
        [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1, QType::Q8_0, QType::Q4K, QType::Q5K, QType::Q6K];

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            QType::Q4K | QType::Q5K | QType::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q8_0 => 34,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
        }
    }

    /// Whether the activations are quantized to `Q8K` (256-blocks) rather than `Q8` (32).
    pub fn k_quant(self) -> bool {
        self.block_len() == 256
    }

    /// Bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_len() as f64
    }

    /// ggml's name (`Q4_K`).
    pub fn name(self) -> &'static str {
        match self {
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q5_0 => "Q5_0",
            QType::Q5_1 => "Q5_1",
            QType::Q8_0 => "Q8_0",
            QType::Q4K => "Q4_K",
            QType::Q5K => "Q5_K",
            QType::Q6K => "Q6_K",
        }
    }
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A row-major `[rows, cols]` matrix of quantized blocks (a linear layer's `W [out, in]`): each
/// row is `cols / block_len` whole blocks. The bytes are shared, so a clone is cheap.
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
    pub data: Arc<[u8]>,
}

impl QMatrix {
    /// Checks that `data` holds exactly `rows` rows of `cols` values in whole blocks.
    pub fn new(qtype: QType, rows: usize, cols: usize, data: Arc<[u8]>) -> anyhow::Result<QMatrix> {
        if cols == 0 || !cols.is_multiple_of(qtype.block_len()) {
            anyhow::bail!(
                "a {qtype} matrix needs rows of whole {}-value blocks, got {cols} columns",
                qtype.block_len()
            );
        }
        let want = rows * cols / qtype.block_len() * qtype.block_bytes();
        if data.len() != want {
            anyhow::bail!("a {rows}×{cols} {qtype} matrix has {want} bytes, got {}", data.len());
        }
        Ok(QMatrix { qtype, rows, cols, data })
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / self.qtype.block_len() * self.qtype.block_bytes()
    }

    /// Row `r`'s blocks.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }

    /// The matrix with its rows taken in `order` (`out[i] = self[order[i]]`): a permutation of a
    /// projection's output rows moves whole rows of blocks.
    pub fn permute_rows(&self, order: &[usize]) -> QMatrix {
        let mut out = Vec::with_capacity(self.data.len());
        for &r in order {
            out.extend_from_slice(self.row(r));
        }
        QMatrix { data: out.into(), ..self.clone() }
    }
}
