//! NIfTI-1 volumes (`.nii`, `.nii.gz`) for the client: read a scan in its own dtype, write a
//! model's output with the scan's header and an affine adjusted for the model's geometry.
//!
//! Axis convention. NIfTI stores `x` fastest, then `y`, `z`, then the 4th dimension. Read in
//! file order, those bytes are a C-order array `[t, z, y, x]`, so a scan maps onto our
//! `[N, C, D, H, W]` with no copy as `N = 1, C = t, D = z, H = y, W = x`. A multi-channel
//! output is written the same way: channels on the 4th NIfTI dimension (`(x, y, z, C)` as
//! nibabel shows it), which FSLeyes, ITK-SNAP, 3D Slicer and MRIcroGL open as a series of
//! volumes over the scan. A 5-D input `(x, y, z, 1, C)` (the NIfTI "vector" layout) is read
//! too.

use std::path::Path;

use nifti::writer::WriterOptions;
use nifti::{
    Endianness, IntoNdArray, NiftiHeader, NiftiObject, NiftiType, NiftiVolume, ReaderOptions,
};

use super::dtype::DType;

#[derive(Debug, thiserror::Error)]
pub enum NiftiFileError {
    #[error("{path}: {source}")]
    Nifti {
        path: String,
        source: nifti::NiftiError,
    },
    #[error("{path}: {what}")]
    Layout { path: String, what: String },
}

/// A scan as it travels: raw little-endian bytes in one of the wire dtypes.
#[derive(Debug, Clone)]
pub struct Scan {
    pub header: NiftiHeader,
    /// `[1, C, D, H, W]` (`D = z`, `H = y`, `W = x`).
    pub shape: [usize; 5],
    pub dtype: DType,
    pub bytes: Vec<u8>,
    /// True when the file's own values could not travel as they are (a dtype the wire lacks,
    /// or a non-identity `scl_slope`/`scl_inter`) and were converted to float32.
    pub converted: bool,
}

/// True for `.nii` and `.nii.gz` paths.
pub fn is_nifti(path: &Path) -> bool {
    let name = path.to_string_lossy().to_ascii_lowercase();
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// Reads a NIfTI-1 scan. INT16, UINT8, UINT16 and FLOAT32 data without scaling are kept
/// byte for byte (swapped to little-endian if needed); anything else, or scaled data, is
/// converted to float32 with `scl_slope`/`scl_inter` applied.
pub fn read_scan(path: &Path) -> Result<Scan, NiftiFileError> {
    let p = path.display().to_string();
    let nerr = |source| NiftiFileError::Nifti {
        path: p.clone(),
        source,
    };
    let obj = ReaderOptions::new().read_file(path).map_err(nerr)?;
    let header = obj.header().clone();
    let dim: Vec<usize> = obj.volume().dim().iter().map(|&d| usize::from(d)).collect();
    let channels = match dim.len() {
        3 => 1,
        4 => dim[3],
        5 if dim[3] == 1 => dim[4],
        _ => {
            return Err(NiftiFileError::Layout {
                path: p,
                what: format!(
                    "expected a 3-D (x, y, z), 4-D (x, y, z, channels) or 5-D (x, y, z, 1, \
                     channels) volume, got dimensions {dim:?}"
                ),
            })
        }
    };
    let shape = [1, channels, dim[2], dim[1], dim[0]];
    let scaled = header.scl_slope != 0.0 && (header.scl_slope != 1.0 || header.scl_inter != 0.0);
    let native = match header.data_type().map_err(nerr)? {
        NiftiType::Uint8 => Some(DType::U8),
        NiftiType::Int16 => Some(DType::I16),
        NiftiType::Uint16 => Some(DType::U16),
        NiftiType::Float32 => Some(DType::F32),
        _ => None,
    };
    let volume = obj.into_volume();
    match native {
        Some(dtype) if !scaled => {
            let mut bytes = volume.into_raw_data();
            if header.endianness == Endianness::Big {
                let size = dtype.size();
                for v in bytes.chunks_exact_mut(size) {
                    v.reverse();
                }
            }
            Ok(Scan {
                header,
                shape,
                dtype,
                bytes,
                converted: false,
            })
        }
        _ => {
            // Converted (and rescaled) by the nifti crate; axes reversed to [C, z, y, x].
            let arr = volume.into_ndarray::<f32>().map_err(nerr)?;
            let arr = arr.reversed_axes();
            let mut bytes = Vec::with_capacity(arr.len() * 4);
            for v in arr.iter() {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            Ok(Scan {
                header,
                shape,
                dtype: DType::F32,
                bytes,
                converted: true,
            })
        }
    }
}

/// How output voxel indices map onto input voxel coordinates along one axis:
/// `input = scale * output + offset` (the centre of the output voxel's receptive field).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AxisMap {
    pub scale: f64,
    pub offset: f64,
}

impl AxisMap {
    pub const IDENTITY: AxisMap = AxisMap {
        scale: 1.0,
        offset: 0.0,
    };

    /// Follows this map with one more layer of kernel `k`, stride `s`, padding `p`,
    /// dilation `d`: the layer's output index `i` sits at `s·i − p + d·(k−1)/2` of its input.
    pub fn then(self, k: u32, s: u32, p: u32, d: u32) -> AxisMap {
        let layer_offset = -f64::from(p) + f64::from(d) * (f64::from(k) - 1.0) / 2.0;
        AxisMap {
            scale: self.scale * f64::from(s),
            offset: self.offset + self.scale * layer_offset,
        }
    }
}

/// The 3×4 affine of a header as NIfTI readers compute it: sform when `sform_code > 0`,
/// else qform when `qform_code > 0`, else the voxel sizes alone.
pub fn affine(h: &NiftiHeader) -> [[f64; 4]; 3] {
    if h.sform_code > 0 {
        let row = |r: [f32; 4]| r.map(f64::from);
        [row(h.srow_x), row(h.srow_y), row(h.srow_z)]
    } else if h.qform_code > 0 {
        qform_affine(h)
    } else {
        let p = |i: usize| f64::from(h.pixdim[i]);
        [
            [p(1), 0.0, 0.0, 0.0],
            [0.0, p(2), 0.0, 0.0],
            [0.0, 0.0, p(3), 0.0],
        ]
    }
}

/// The qform affine (NIfTI-1 "method 2": quaternion, voxel sizes, qfac and offsets).
fn qform_affine(h: &NiftiHeader) -> [[f64; 4]; 3] {
    let (b, c, d) = (
        f64::from(h.quatern_b),
        f64::from(h.quatern_c),
        f64::from(h.quatern_d),
    );
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let scale = [
        f64::from(h.pixdim[1]),
        f64::from(h.pixdim[2]),
        f64::from(h.pixdim[3]) * qfac,
    ];
    let offset = [
        f64::from(h.quatern_x),
        f64::from(h.quatern_y),
        f64::from(h.quatern_z),
    ];
    let mut m = [[0.0; 4]; 3];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = r[i][j] * scale[j];
        }
        m[i][3] = offset[i];
    }
    m
}

fn apply(m: &[[f64; 4]; 3], v: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|i| m[i][0] * v[0] + m[i][1] * v[1] + m[i][2] * v[2] + m[i][3])
}

/// The header of an output volume: the input's header with voxel sizes multiplied by the
/// model's stride and both qform and sform origins moved to the centre of output voxel 0,
/// so the output overlays the input in a viewer. `maps` are for `(x, y, z)` = `(W, H, D)`.
pub fn output_header(input: &NiftiHeader, maps: [AxisMap; 3], description: &str) -> NiftiHeader {
    let mut h = input.clone();
    let o = maps.map(|m| m.offset);
    if h.qform_code > 0 {
        let q = qform_affine(input);
        let origin = apply(&q, o);
        h.quatern_x = origin[0] as f32;
        h.quatern_y = origin[1] as f32;
        h.quatern_z = origin[2] as f32;
    }
    if h.sform_code > 0 {
        let s = affine(input);
        let mut rows = [[0f32; 4]; 3];
        for (i, row) in rows.iter_mut().enumerate() {
            for j in 0..3 {
                row[j] = (s[i][j] * maps[j].scale) as f32;
            }
            row[3] = (s[i][0] * o[0] + s[i][1] * o[1] + s[i][2] * o[2] + s[i][3]) as f32;
        }
        h.srow_x = rows[0];
        h.srow_y = rows[1];
        h.srow_z = rows[2];
    }
    for (i, m) in maps.iter().enumerate() {
        h.pixdim[i + 1] = (f64::from(input.pixdim[i + 1]) * m.scale) as f32;
    }
    // The 4th dimension holds channels, not time.
    h.pixdim[4] = 1.0;
    h.xyzt_units &= 0x07;
    h.toffset = 0.0;
    h.slice_duration = 0.0;
    h.intent_code = 0;
    h.cal_min = 0.0;
    h.cal_max = 0.0;
    h.vox_offset = 352.0;
    let mut descrip = description.as_bytes().to_vec();
    descrip.truncate(79);
    descrip.resize(80, 0);
    h.descrip = descrip;
    h.aux_file = [0; 24];
    h.endianness = Endianness::Little;
    h
}

/// Writes `[1, C, D, H, W]` data as a NIfTI-1 file (`.nii.gz` compresses): `(x, y, z)` for
/// one channel, `(x, y, z, C)` for several. The dtype follows `T`; scaling is reset to none.
pub fn write_volume<T: nifti::DataElement + bytemuck::Pod>(
    path: &Path,
    header: &NiftiHeader,
    shape: [usize; 5],
    data: &[T],
) -> Result<(), NiftiFileError> {
    let p = path.display().to_string();
    let [n, c, d, h, w] = shape;
    if n != 1 {
        return Err(NiftiFileError::Layout {
            path: p,
            what: format!("NIfTI holds one volume; the output has batch size {n}"),
        });
    }
    if [c, d, h, w]
        .iter()
        .any(|&v| v > usize::from(i16::MAX as u16))
    {
        return Err(NiftiFileError::Layout {
            path: p,
            what: format!(
                "NIfTI-1 dimensions are at most 32767, the output is {shape:?} [N, C, D, H, W]"
            ),
        });
    }
    let nerr = |source| NiftiFileError::Nifti {
        path: p.clone(),
        source,
    };
    // A C-order [C, z, y, x] view, axes reversed to NIfTI's logical (x, y, z, C): the writer
    // walks it in file order with no copy.
    let view =
        ndarray::ArrayView::from_shape((c, d, h, w), data).map_err(|e| NiftiFileError::Layout {
            path: p.clone(),
            what: e.to_string(),
        })?;
    let opts = WriterOptions::new(path).reference_header(header);
    if c == 1 {
        let v3 = view.index_axis_move(ndarray::Axis(0), 0).reversed_axes();
        opts.write_nifti(&v3).map_err(nerr)
    } else {
        opts.write_nifti(&view.reversed_axes()).map_err(nerr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: [f64; 3], b: [f64; 3]) -> bool {
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4)
    }

    #[test]
    fn axis_map_composes_stride_padding_and_dilation() {
        // conv k3 p1 (centre stays), maxpool k2 s2 (centre at 0.5), conv k3 d2 p0 (centre +2).
        let m = AxisMap::IDENTITY
            .then(3, 1, 1, 1)
            .then(2, 2, 0, 1)
            .then(3, 1, 0, 2);
        assert_eq!(m.scale, 2.0);
        assert_eq!(m.offset, 0.5 + 2.0 * 2.0);
    }

    #[test]
    fn qform_of_a_rotation_matches_its_matrix() {
        // 90° about z: quaternion (a, b, c, d) = (cos 45°, 0, 0, sin 45°).
        let mut h = NiftiHeader {
            sform_code: 0,
            qform_code: 1,
            quatern_d: std::f32::consts::FRAC_1_SQRT_2,
            quatern_x: 10.0,
            ..NiftiHeader::default()
        };
        h.pixdim[1] = 2.0;
        let a = affine(&h);
        assert!(close(apply(&a, [1.0, 0.0, 0.0]), [10.0, 2.0, 0.0]), "{a:?}");
        assert!(close(apply(&a, [0.0, 1.0, 0.0]), [9.0, 0.0, 0.0]), "{a:?}");
    }

    #[test]
    fn output_header_maps_output_voxels_onto_their_input_centres() {
        let mut h = NiftiHeader {
            qform_code: 1,
            sform_code: 1,
            quatern_b: 0.0,
            quatern_c: 0.0,
            quatern_d: std::f32::consts::FRAC_1_SQRT_2,
            quatern_x: -5.0,
            quatern_y: 7.0,
            quatern_z: 3.0,
            ..NiftiHeader::default()
        };
        h.pixdim[1..4].copy_from_slice(&[0.8, 0.9, 1.5]);
        // The sform is the same rotation written out, so both agree.
        let q = qform_affine(&h);
        h.srow_x = q[0].map(|v| v as f32);
        h.srow_y = q[1].map(|v| v as f32);
        h.srow_z = q[2].map(|v| v as f32);
        let maps = [
            AxisMap {
                scale: 2.0,
                offset: 0.5,
            },
            AxisMap {
                scale: 1.0,
                offset: 1.0,
            },
            AxisMap {
                scale: 4.0,
                offset: 1.5,
            },
        ];
        let out = output_header(&h, maps, "test");
        for v in [[0.0, 0.0, 0.0], [3.0, 1.0, 2.0], [1.0, 5.0, 0.0]] {
            let in_vox = [0, 1, 2].map(|i| maps[i].scale * v[i] + maps[i].offset);
            let want = apply(&affine(&h), in_vox);
            assert!(close(apply(&affine(&out), v), want), "sform at {v:?}");
            assert!(close(apply(&qform_affine(&out), v), want), "qform at {v:?}");
        }
    }

    #[test]
    fn scans_round_trip_with_their_dtype_and_axes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.nii.gz");
        // (x, y, z, C) = (4, 3, 2, 2) written from a C-order [C, z, y, x] ramp.
        let shape = [1, 2, 2, 3, 4];
        let data: Vec<f32> = (0..48).map(|v| v as f32).collect();
        let h = output_header(&NiftiHeader::default(), [AxisMap::IDENTITY; 3], "t");
        write_volume(&path, &h, shape, &data).unwrap();
        let scan = read_scan(&path).unwrap();
        assert_eq!(scan.shape, shape);
        assert_eq!(scan.dtype, DType::F32);
        assert!(!scan.converted);
        let got: Vec<f32> = scan
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(got, data);
    }
}
