//! The request side of `InferStream`: a volume cut into chunks with their byte offsets.

use bytes::Bytes;

use crate::proto::voxconv::v1 as pb;

/// Smallest and largest input chunk a client sends: the largest stays under the server's
/// default 4 MiB message limit with room for framing.
pub const MIN_CHUNK_BYTES: usize = 4096;
pub const MAX_CHUNK_BYTES: usize = 3 << 20;

/// A requested chunk size, clamped to [`MIN_CHUNK_BYTES`]..=[`MAX_CHUNK_BYTES`].
pub fn chunk_size(requested: usize) -> usize {
    requested.clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
}

/// `data` as chunk messages of `chunk` bytes (the last shorter), in order, each with its
/// byte offset; slices of `data`, no copy. `chunk` must be at least 1.
pub fn input_chunks(data: Bytes, chunk: usize) -> impl Iterator<Item = pb::InferStreamRequest> {
    let chunk = chunk.max(1);
    (0..data.len())
        .step_by(chunk)
        .map(move |off| pb::InferStreamRequest {
            msg: Some(pb::infer_stream_request::Msg::Chunk(pb::Chunk {
                offset: off as u64,
                data: data.slice(off..(off + chunk).min(data.len())),
            })),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_data_in_order_without_gaps() {
        let data = Bytes::from((0..10_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        for size in [1, 7, 4096, 9_999, 10_000, 20_000] {
            let mut at = 0u64;
            let mut joined = Vec::new();
            for m in input_chunks(data.clone(), size) {
                let Some(pb::infer_stream_request::Msg::Chunk(c)) = m.msg else {
                    panic!("not a chunk")
                };
                assert_eq!(c.offset, at, "size {size}");
                assert!(c.data.len() <= size && !c.data.is_empty());
                at += c.data.len() as u64;
                joined.extend_from_slice(&c.data);
            }
            assert_eq!(joined, data, "size {size}");
        }
        assert_eq!(input_chunks(Bytes::new(), 4096).count(), 0);
        assert_eq!(chunk_size(0), MIN_CHUNK_BYTES);
        assert_eq!(chunk_size(usize::MAX), MAX_CHUNK_BYTES);
    }
}
