//! `voxconv phantom`: a 3-D Shepp–Logan head phantom, so anyone can try the service without
//! patient data.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use nifti::NiftiHeader;

use crate::tensor::nifti::{is_nifti, write_volume};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PhantomDType {
    /// Intensities × 1000 (0–1000), like CT numbers.
    Int16,
    /// Intensities × 250 (0–250).
    Uint8,
    /// Intensities as they are (0–1).
    Float32,
}

#[derive(Debug, Args)]
pub struct PhantomArgs {
    /// Edge length in voxels (the volume is N×N×N).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(2..=1024))]
    pub size: u16,
    /// Output file: .nii, .nii.gz or .npy ([1, 1, N, N, N], C order: z, y, x).
    #[arg(long)]
    pub output: PathBuf,
    /// Stored dtype.
    #[arg(long, value_enum, default_value_t = PhantomDType::Int16)]
    pub dtype: PhantomDType,
    /// Voxel edge in millimetres (the affine centres the volume on the origin).
    #[arg(long, default_value_t = 1.0)]
    pub voxel_mm: f32,
}

/// One ellipsoid: intensity added inside, semi-axes (a, b, c), centre (x0, y0, z0), and
/// rotation about z in degrees; coordinates in the unit cube [-1, 1]³.
struct Ellipsoid {
    value: f64,
    axes: [f64; 3],
    centre: [f64; 3],
    rot_z_deg: f64,
}

/// The 3-D Shepp–Logan phantom of Kak & Slaney with the higher-contrast intensities of Toft's
/// "modified" version (as in MATLAB's `phantom('Modified Shepp-Logan')` and its 3-D
/// extension). Every ellipsoid's Euler rotation has θ = 0, so it is one rotation about z.
const ELLIPSOIDS: [Ellipsoid; 10] = [
    e(1.0, [0.69, 0.92, 0.81], [0.0, 0.0, 0.0], 0.0),
    e(-0.8, [0.6624, 0.874, 0.78], [0.0, -0.0184, 0.0], 0.0),
    e(-0.2, [0.11, 0.31, 0.22], [0.22, 0.0, 0.0], -8.0),
    e(-0.2, [0.16, 0.41, 0.28], [-0.22, 0.0, 0.0], 28.0),
    e(0.1, [0.21, 0.25, 0.41], [0.0, 0.35, -0.15], 0.0),
    e(0.1, [0.046, 0.046, 0.05], [0.0, 0.1, 0.25], 0.0),
    e(0.1, [0.046, 0.046, 0.05], [0.0, -0.1, 0.25], 0.0),
    e(0.1, [0.046, 0.023, 0.05], [-0.08, -0.605, 0.0], 0.0),
    e(0.1, [0.023, 0.023, 0.02], [0.0, -0.606, 0.0], 0.0),
    e(0.1, [0.023, 0.046, 0.02], [0.06, -0.605, 0.0], 0.0),
];

const fn e(value: f64, axes: [f64; 3], centre: [f64; 3], rot_z_deg: f64) -> Ellipsoid {
    Ellipsoid {
        value,
        axes,
        centre,
        rot_z_deg,
    }
}

/// The phantom as float intensities (0–1) in C order `[z, y, x]`, `n` voxels a side.
pub fn shepp_logan(n: usize) -> Vec<f32> {
    let coord = |i: usize| {
        if n == 1 {
            0.0
        } else {
            -1.0 + 2.0 * i as f64 / (n - 1) as f64
        }
    };
    let mut out = vec![0f32; n * n * n];
    for el in &ELLIPSOIDS {
        let (sin, cos) = el.rot_z_deg.to_radians().sin_cos();
        for z in 0..n {
            let dz = (coord(z) - el.centre[2]) / el.axes[2];
            if dz.abs() > 1.0 {
                continue;
            }
            for y in 0..n {
                let py = coord(y) - el.centre[1];
                let row = &mut out[(z * n + y) * n..][..n];
                for (x, v) in row.iter_mut().enumerate() {
                    let px = coord(x) - el.centre[0];
                    let rx = (cos * px + sin * py) / el.axes[0];
                    let ry = (-sin * px + cos * py) / el.axes[1];
                    if rx * rx + ry * ry + dz * dz <= 1.0 {
                        *v += el.value as f32;
                    }
                }
            }
        }
    }
    // Overlapping negative ellipsoids can leave -0.0 or tiny rounding below zero.
    for v in &mut out {
        *v = v.max(0.0);
    }
    out
}

/// A header for an `n`³ volume of `voxel_mm` voxels centred on the scanner origin, with the
/// same affine as qform and sform (RAS, millimetres).
pub fn phantom_header(n: usize, voxel_mm: f32) -> NiftiHeader {
    let origin = -(n as f32 - 1.0) / 2.0 * voxel_mm;
    let mut h = NiftiHeader {
        qform_code: 1,
        sform_code: 1,
        quatern_x: origin,
        quatern_y: origin,
        quatern_z: origin,
        srow_x: [voxel_mm, 0.0, 0.0, origin],
        srow_y: [0.0, voxel_mm, 0.0, origin],
        srow_z: [0.0, 0.0, voxel_mm, origin],
        xyzt_units: 2, // millimetres
        ..NiftiHeader::default()
    };
    h.pixdim = [1.0, voxel_mm, voxel_mm, voxel_mm, 1.0, 1.0, 1.0, 1.0];
    let mut descrip = b"voxconv phantom: 3-D Shepp-Logan (modified)".to_vec();
    descrip.resize(80, 0);
    h.descrip = descrip;
    h
}

pub fn run(a: PhantomArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !(a.voxel_mm.is_finite() && a.voxel_mm > 0.0) {
        return Err(format!("--voxel-mm: expected a positive size, got {}", a.voxel_mm).into());
    }
    let n = usize::from(a.size);
    let v = shepp_logan(n);
    let shape = [1, 1, n, n, n];
    let is_npy = a
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if !is_npy && !is_nifti(&a.output) {
        return Err(format!(
            "--output: expected a .nii, .nii.gz or .npy path, got {}",
            a.output.display()
        )
        .into());
    }
    let header = phantom_header(n, a.voxel_mm);
    let (scale, name) = match a.dtype {
        PhantomDType::Int16 => (1000.0, "int16"),
        PhantomDType::Uint8 => (250.0, "uint8"),
        PhantomDType::Float32 => (1.0, "float32"),
    };
    let scaled = |s: f32| v.iter().map(move |&x| (x * s).round());
    match (a.dtype, is_npy) {
        (PhantomDType::Int16, false) => {
            let d: Vec<i16> = scaled(scale).map(|x| x as i16).collect();
            write_volume(&a.output, &header, shape, &d)?;
        }
        (PhantomDType::Uint8, false) => {
            let d: Vec<u8> = scaled(scale).map(|x| x as u8).collect();
            write_volume(&a.output, &header, shape, &d)?;
        }
        (PhantomDType::Float32, false) => write_volume(&a.output, &header, shape, &v)?,
        (PhantomDType::Int16, true) => {
            let d: Vec<i16> = scaled(scale).map(|x| x as i16).collect();
            crate::tensor::write_npy_typed(&a.output, &shape, d)?;
        }
        (PhantomDType::Uint8, true) => {
            let d: Vec<u8> = scaled(scale).map(|x| x as u8).collect();
            crate::tensor::write_npy_typed(&a.output, &shape, d)?;
        }
        (PhantomDType::Float32, true) => crate::tensor::write_npy(&a.output, &shape, v)?,
    }
    eprintln!(
        "phantom: {n}x{n}x{n} {name}, {} mm voxels -> {}",
        a.voxel_mm,
        a.output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phantom_has_skull_brain_and_background() {
        let n = 64;
        let v = shepp_logan(n);
        let at = |z: usize, y: usize, x: usize| v[(z * n + y) * n + x];
        // Corner: outside the head.
        assert_eq!(at(0, 0, 0), 0.0);
        // Skull (outer ellipsoid only) along x at the centre slice: 1.0.
        let c = n / 2;
        assert!((at(c, c, 2) - 0.0).abs() < 1e-6, "outside along x");
        assert!(
            (0..n).any(|x| (at(c, c, x) - 1.0).abs() < 1e-6),
            "no skull voxel on the centre row"
        );
        // Brain matter: 1.0 - 0.8 = 0.2 near the centre (between the two ventricles).
        assert!((at(c, c, c) - 0.2).abs() < 1e-6, "{}", at(c, c, c));
        // Every value is one of the sums of intensities, inside [0, 1].
        assert!(v.iter().all(|&x| (0.0..=1.0 + 1e-6).contains(&x)));
    }
}
