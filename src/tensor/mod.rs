//! Tensors: `.npy` files for the command line and wire dtypes for the service.

pub mod dtype;

use std::path::Path;

use ndarray::{ArrayD, IxDyn};

/// A dense float32 tensor in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: ndarray_npy::ReadNpyError,
    },
    #[error("{path}: {source}")]
    Write {
        path: String,
        source: ndarray_npy::WriteNpyError,
    },
    #[error("{path}: expected a {expected}-D array, got shape {got:?}")]
    Rank {
        path: String,
        expected: usize,
        got: Vec<usize>,
    },
}

/// Reads a float32 `.npy` file (C or Fortran order; returned in C order).
pub fn read_npy(path: &Path) -> Result<Tensor, TensorFileError> {
    let arr: ArrayD<f32> = ndarray_npy::read_npy(path).map_err(|source| TensorFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let shape = arr.shape().to_vec();
    let data = if arr.is_standard_layout() {
        arr.into_raw_vec_and_offset().0
    } else {
        arr.as_standard_layout().iter().copied().collect()
    };
    Ok(Tensor { shape, data })
}

/// Reads a `.npy` file and checks its rank.
pub fn read_npy_rank(path: &Path, rank: usize) -> Result<Tensor, TensorFileError> {
    let t = read_npy(path)?;
    if t.shape.len() != rank {
        return Err(TensorFileError::Rank {
            path: path.display().to_string(),
            expected: rank,
            got: t.shape,
        });
    }
    Ok(t)
}

/// Writes a float32 C-order `.npy` file.
pub fn write_npy(path: &Path, shape: &[usize], data: Vec<f32>) -> Result<(), TensorFileError> {
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data)
        .expect("shape and data length agree (checked by the kernel)");
    ndarray_npy::write_npy(path, &arr).map_err(|source| TensorFileError::Write {
        path: path.display().to_string(),
        source,
    })
}
