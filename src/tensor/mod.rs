//! Tensors: `.npy` files for the command line and wire dtypes for the service.

pub mod dtype;
pub mod nifti;

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
    write_npy_typed(path, shape, data)
}

/// Writes a C-order `.npy` file of any element type ndarray-npy writes.
pub fn write_npy_typed<T: ndarray_npy::WritableElement>(
    path: &Path,
    shape: &[usize],
    data: Vec<T>,
) -> Result<(), TensorFileError> {
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data)
        .expect("shape and data length agree (built by the caller)");
    ndarray_npy::write_npy(path, &arr).map_err(|source| TensorFileError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// A `.npy` volume kept in its own dtype, as little-endian bytes in C order.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub dtype: dtype::DType,
    pub bytes: Vec<u8>,
}

/// A shape and its little-endian bytes.
type ShapeBytes = (Vec<usize>, Vec<u8>);

/// Reads a `.npy` file of float32, int16, uint16 or uint8 without converting its values.
pub fn read_npy_raw(path: &Path) -> Result<RawTensor, TensorFileError> {
    use dtype::DType;
    use ndarray_npy::{ReadNpyError, ReadNpyExt};
    let err = |source| TensorFileError::Read {
        path: path.display().to_string(),
        source,
    };
    /// The array as little-endian bytes, or `None` when the file holds another dtype.
    fn take<T: ndarray_npy::ReadableElement + bytemuck::Pod>(
        file: &[u8],
    ) -> Result<Option<ShapeBytes>, ReadNpyError> {
        match ArrayD::<T>::read_npy(file) {
            Ok(a) => {
                let shape = a.shape().to_vec();
                let values = a.as_standard_layout();
                let values = values.as_slice().expect("standard layout is contiguous");
                let mut bytes = bytemuck::cast_slice::<T, u8>(values).to_vec();
                if cfg!(target_endian = "big") {
                    for v in bytes.chunks_exact_mut(std::mem::size_of::<T>()) {
                        v.reverse();
                    }
                }
                Ok(Some((shape, bytes)))
            }
            Err(ReadNpyError::WrongDescriptor(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
    let file = std::fs::read(path).map_err(|e| err(ReadNpyError::Io(e)))?;
    let (dtype, (shape, bytes)) = if let Some(r) = take::<f32>(&file).map_err(err)? {
        (DType::F32, r)
    } else if let Some(r) = take::<i16>(&file).map_err(err)? {
        (DType::I16, r)
    } else if let Some(r) = take::<u16>(&file).map_err(err)? {
        (DType::U16, r)
    } else if let Some(r) = take::<u8>(&file).map_err(err)? {
        (DType::U8, r)
    } else {
        // None of the wire dtypes: report it against float32, the common case.
        return Err(err(ArrayD::<f32>::read_npy(&file[..]).unwrap_err()));
    };
    Ok(RawTensor {
        shape,
        dtype,
        bytes,
    })
}
