//! Bounded reads from an image: a file on disk, or a byte buffer in the tests.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::DiskFormat;
use crate::qcow2::inspect::InspectError;

/// Something an image's headers are read from. Reads past the end are a [`InspectError::Truncated`]
/// naming the structure, never a panic or a short buffer.
pub(crate) trait Source {
    fn len(&self) -> u64;

    /// Fills `buf` from `offset`; the caller has checked that the range lies in the image.
    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<(), InspectError>;

    /// The first `n` bytes, or the whole image if it is shorter.
    fn head(&self, n: usize) -> Result<Vec<u8>, InspectError> {
        let n = (n as u64).min(self.len()) as usize;
        let mut b = vec![0u8; n];
        self.read_into(&mut b, 0)?;
        Ok(b)
    }

    /// Exactly `n` bytes at `offset`, or `Truncated` naming `what` of `format`.
    fn bytes(
        &self,
        offset: u64,
        n: usize,
        format: DiskFormat,
        what: &'static str,
    ) -> Result<Vec<u8>, InspectError> {
        let fits = offset
            .checked_add(n as u64)
            .is_some_and(|end| end <= self.len());
        if !fits {
            return Err(InspectError::Truncated { format, what });
        }
        let mut b = vec![0u8; n];
        self.read_into(&mut b, offset)?;
        Ok(b)
    }
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }

    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<(), InspectError> {
        let start = offset as usize;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
}

impl Source for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<(), InspectError> {
        self.as_slice().read_into(buf, offset)
    }
}

/// An image file; `len` is read once, so a file growing under us cannot move the bounds.
pub(crate) struct FileSource<'a> {
    pub file: &'a File,
    pub len: u64,
    pub path: &'a Path,
}

impl Source for FileSource<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<(), InspectError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| InspectError::Io {
                path: self.path.to_owned(),
                source,
            })
    }
}
