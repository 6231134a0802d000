//! rkyv encoding with validation on the way in.
//!
//! Bytes that come from a peer or from disk are untrusted: [`decode`] checks the archive with
//! bytecheck before anything reads it, so a malformed or truncated frame is an error, never a
//! panic or an out-of-bounds read.

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

/// A value could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed {type_name} encoding ({len} bytes): {reason}")]
pub struct DecodeError {
    pub type_name: &'static str,
    pub len: usize,
    pub reason: String,
}

/// Encodes a value.
pub fn encode<T>(value: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
{
    // Serialising our own in-memory values only fails on allocation failure, which aborts
    // anyway.
    rkyv::to_bytes::<rancor::Error>(value)
        .expect("rkyv serialisation into memory cannot fail")
        .into_vec()
}

/// Decodes and validates a value. The input need not be aligned.
pub fn decode<T>(bytes: &[u8]) -> Result<T, DecodeError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    // rkyv reads archives in place and needs them aligned; a frame read off a socket is not.
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rancor::Error>(&aligned).map_err(|e| DecodeError {
        type_name: std::any::type_name::<T>(),
        len: bytes.len(),
        reason: e.to_string(),
    })
}
