//! A strided view of an `f32` matrix, the operand type of the GEMMs ([`super::gemm`] and its
//! AVX-512 kernel [`super::gemm_avx512`], which both take it and so share this leaf).

/// A matrix operand: the data, its row stride and its column stride (in elements).
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        MatRef { data, row_stride: cols, col_stride: 1 }
    }
    /// The transpose of a row-major `rows × cols` matrix, seen as `cols × rows`.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        MatRef { data, row_stride: 1, col_stride: cols }
    }
}
