//! qcow2 v3: the header codec, native overlay creation and the upload inspector.

pub mod header;
pub mod inspect;
pub mod overlay;

pub use header::{Header, HeaderError};
pub use inspect::{
    inspect, inspect_with, InspectError, InspectPolicy, Qcow2Info, MAX_VIRTUAL_SIZE,
};

// The upload check covers every format now; callers still find it here.
pub use crate::formats::{check_upload, detect_format, DiskFormat, ImageInfo};
pub use overlay::{
    create_overlay, parse_size, BackingFormat, OverlayError, OverlayInfo, OverlayLayout,
    OverlaySpec, SyncMode, DEFAULT_CLUSTER_BITS,
};
