//! Wire dtypes: little-endian bytes to f32 (input) and f32 to FP32/FP16 bytes (output).

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

/// Values converted per block between float32 and float16 (stack buffers, F16C-sized work).
const HALF_BLOCK: usize = 1024;

/// Element types accepted on the wire. Compute is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I16,
    U16,
    U8,
}

impl DType {
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I16,
        DType::U16,
        DType::U8,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::U8 => 1,
        }
    }

    /// Name as in the API (`FP32`, `FP16`, `BF16`, `INT16`, `UINT16`, `UINT8`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "FP32",
            DType::F16 => "FP16",
            DType::BF16 => "BF16",
            DType::I16 => "INT16",
            DType::U16 => "UINT16",
            DType::U8 => "UINT8",
        }
    }

    /// Whether outputs may be produced in this dtype.
    pub fn is_output(self) -> bool {
        matches!(self, DType::F32 | DType::F16)
    }
}

/// Decodes whole little-endian elements of `dtype` from `bytes` into `out`
/// (`out.len() == bytes.len() / size`).
pub fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        DType::F32 if cfg!(target_endian = "little") => {
            // The wire format is the memory format: one copy.
            bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
        }
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            // Through a small buffer, so half's slice conversion can use F16C (runtime
            // detected); one value at a time it is several times slower.
            let mut bits = [0u16; HALF_BLOCK];
            for (o, b) in out.chunks_mut(HALF_BLOCK).zip(bytes.chunks(2 * HALF_BLOCK)) {
                let bits = &mut bits[..o.len()];
                for (x, b) in bits.iter_mut().zip(b.chunks_exact(2)) {
                    *x = u16::from_le_bytes([b[0], b[1]]);
                }
                bits.reinterpret_cast::<f16>().convert_to_f32_slice(o);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::I16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from(i16::from_le_bytes([b[0], b[1]]));
            }
        }
        DType::U16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        DType::U8 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = f32::from(b);
            }
        }
    }
}

/// Appends `values` encoded as `dtype` (FP32 or FP16), little-endian.
pub fn encode(dtype: DType, values: &[f32], out: &mut Vec<u8>) {
    match dtype {
        DType::F16 => {
            out.reserve(values.len() * 2);
            let mut halves = [f16::ZERO; HALF_BLOCK];
            for v in values.chunks(HALF_BLOCK) {
                let halves = &mut halves[..v.len()];
                halves.convert_from_f32_slice(v);
                if cfg!(target_endian = "little") {
                    out.extend_from_slice(bytemuck::cast_slice::<f16, u8>(halves));
                } else {
                    for h in halves.iter() {
                        out.extend_from_slice(&h.to_le_bytes());
                    }
                }
            }
        }
        // Labels: whole numbers in range (an argmax), saturating otherwise.
        DType::U8 => out.extend(values.iter().map(|&v| v as u8)),
        DType::U16 => {
            out.reserve(values.len() * 2);
            for &v in values {
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
        }
        _ if cfg!(target_endian = "little") => {
            out.extend_from_slice(bytemuck::cast_slice::<f32, u8>(values));
        }
        _ => {
            out.reserve(values.len() * 4);
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Decodes a byte stream that arrives in pieces whose boundaries may split an element.
#[derive(Debug)]
/// Decodes a byte stream piece by piece into whole values (a value split between pieces
/// is carried over), for callers that place the values themselves.
pub struct PieceDecoder {
    dtype: DType,
    carry: [u8; 4],
    carry_len: usize,
}

impl PieceDecoder {
    pub fn new(dtype: DType) -> Self {
        Self {
            dtype,
            carry: [0; 4],
            carry_len: 0,
        }
    }

    /// Appends the whole values `bytes` completes to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(
            start + (self.carry_len + bytes.len()) / self.dtype.size(),
            0.0,
        );
        let n = self.push_into(bytes, &mut out[start..]);
        debug_assert_eq!(start + n, out.len());
    }

    /// Decodes the whole values `bytes` completes into the front of `out` (which must hold
    /// them: `(carried + bytes.len()) / size` values) and returns how many.
    pub fn push_into(&mut self, mut bytes: &[u8], out: &mut [f32]) -> usize {
        let size = self.dtype.size();
        let mut n = 0;
        if self.carry_len > 0 {
            let take = (size - self.carry_len).min(bytes.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
            self.carry_len += take;
            bytes = &bytes[take..];
            if self.carry_len < size {
                return 0;
            }
            let carry = self.carry;
            decode(self.dtype, &carry[..size], &mut out[..1]);
            n = 1;
            self.carry_len = 0;
        }
        let whole = bytes.len() / size;
        decode(self.dtype, &bytes[..whole * size], &mut out[n..n + whole]);
        let rest = &bytes[whole * size..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
        n + whole
    }
}

/// Decodes an upload of a known number of values, piece by piece, into one buffer.
pub struct StreamDecoder {
    pieces: PieceDecoder,
    out: Vec<f32>,
    filled: usize,
}

impl StreamDecoder {
    /// A decoder for exactly `elements` values (the buffer is allocated here, once).
    pub fn new(dtype: DType, elements: usize) -> Self {
        Self {
            pieces: PieceDecoder::new(dtype),
            out: vec![0f32; elements],
            filled: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn bytes_received(&self) -> usize {
        self.filled * self.pieces.dtype.size() + self.pieces.carry_len
    }

    /// Bytes expected in total.
    pub fn bytes_expected(&self) -> usize {
        self.out.len() * self.pieces.dtype.size()
    }

    /// Decodes the next piece; the caller has checked it does not run past the end.
    pub fn push(&mut self, bytes: &[u8]) {
        self.filled += self.pieces.push_into(bytes, &mut self.out[self.filled..]);
    }

    /// The decoded values, once every byte has arrived.
    pub fn finish(self) -> Option<Vec<f32>> {
        (self.filled == self.out.len() && self.pieces.carry_len == 0).then_some(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the blocked F16C conversion: bit-identical to converting one value at a time
    /// (round to nearest even, NaN, infinities, subnormals, overflow), across block edges.
    #[test]
    fn blocked_f16_conversion_matches_one_at_a_time() {
        let specials = [
            0.0,
            -0.0,
            1.0 / 3.0,
            65504.0,
            65520.0,
            1e9,
            -1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            5.96e-8,
            1e-10,
            2049.0,
            2051.0,
        ];
        for n in [
            0,
            1,
            7,
            HALF_BLOCK - 1,
            HALF_BLOCK,
            HALF_BLOCK + 1,
            3 * HALF_BLOCK + 5,
        ] {
            let values: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 5 == 0 {
                        specials[i / 5 % specials.len()]
                    } else {
                        (i as f32 * 0.731).sin() * 10f32.powi((i % 11) as i32 - 5)
                    }
                })
                .collect();
            let mut enc = Vec::new();
            encode(DType::F16, &values, &mut enc);
            let want: Vec<u8> = values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect();
            assert_eq!(enc, want, "encode, n = {n}");
            let mut back = vec![f32::NAN; n];
            decode(DType::F16, &enc, &mut back);
            for (i, (b, w)) in back.iter().zip(want.chunks_exact(2)).enumerate() {
                let w = f16::from_le_bytes([w[0], w[1]]).to_f32();
                assert_eq!(b.to_bits(), w.to_bits(), "decode, n = {n}, value {i}");
            }
        }
    }

    #[test]
    fn stream_decoder_handles_split_elements() {
        let values: Vec<i16> = vec![-32768, -1, 0, 1, 1234, 32767];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for split in 1..bytes.len() {
            let mut d = StreamDecoder::new(DType::I16, values.len());
            for piece in bytes.chunks(split) {
                d.push(piece);
            }
            let got = d.finish().unwrap();
            let want: Vec<f32> = values.iter().map(|&v| f32::from(v)).collect();
            assert_eq!(got, want, "split {split}");
        }
        let mut d = StreamDecoder::new(DType::F32, 2);
        d.push(&[0, 0, 128]);
        assert!(d.finish().is_none());
    }

    #[test]
    fn every_dtype_round_trips_representable_values() {
        let vals = [0.0f32, 1.0, 2.0, 3.0, 100.0, 255.0];
        for dt in DType::ALL {
            let bytes: Vec<u8> = match dt {
                DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::F16 => vals
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
                DType::BF16 => vals
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                DType::I16 => vals
                    .iter()
                    .flat_map(|v| (*v as i16).to_le_bytes())
                    .collect(),
                DType::U16 => vals
                    .iter()
                    .flat_map(|v| (*v as u16).to_le_bytes())
                    .collect(),
                DType::U8 => vals.iter().map(|v| *v as u8).collect(),
            };
            let mut out = vec![0f32; vals.len()];
            decode(dt, &bytes, &mut out);
            assert_eq!(out, vals, "{}", dt.name());
        }
        let mut enc = Vec::new();
        encode(DType::F16, &[1.5, -2.0], &mut enc);
        let mut back = [0f32; 2];
        decode(DType::F16, &enc, &mut back);
        assert_eq!(back, [1.5, -2.0]);
    }
}
