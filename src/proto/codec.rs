//! The protobuf codec of both APIs: prost's, except that a message that does not decode is
//! the sender's mistake, INVALID_ARGUMENT (prost's codec says INTERNAL, which would count
//! and alert on a client's bad bytes as a server bug).

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Response header with which the codec marks its INVALID_ARGUMENT for an undecodable
/// message. A unary message is decoded before any handler runs, so the front layer counts
/// the call by this mark (and removes it before the answer leaves).
pub const DECODE_REFUSED: &str = "x-voxconv-decode-refused";

/// [`ProstCodec`] with undecodable messages answered INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(self.0.decoder())
    }
}

/// Decodes as prost does; a decode failure becomes INVALID_ARGUMENT naming the message type.
#[derive(Debug)]
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| match s.code() {
            Code::Internal => {
                let mut s = Status::invalid_argument(format!(
                    "message: the bytes do not decode as {}: {}",
                    short_type_name::<U>(),
                    s.message()
                ));
                s.metadata_mut().insert(
                    DECODE_REFUSED,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                s
            }
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// `voxconv::proto::voxconv::v1::InferRequest` → `InferRequest`.
fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}
