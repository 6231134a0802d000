//! The `[images]` section of a node's config: where image bytes live and how much of them this
//! node keeps. The node's config file embeds it; the binary checks its ranges when it loads.

use serde::{Deserialize, Serialize};

/// Where image bytes live and how much of them this node keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesSection {
    /// Copies of every chunk across the cluster (spread over zones where possible).
    #[serde(default = "default_replication")]
    pub replication: usize,
    /// Chunk size in bytes: a multiple of 4096 between 64 KiB and 64 MiB.
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u64,
    /// Largest image accepted by an upload, in bytes.
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: u64,
    /// Size budget of the base-image cache, in bytes; least recently used images beyond it are
    /// evicted.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// An unused cached image younger than this is never evicted, in seconds.
    #[serde(default = "default_cache_min_age")]
    pub cache_min_age_secs: u64,
    /// A chunk holder that has been unreachable this long, in seconds, no longer counts as a
    /// copy: its chunks are copied to other nodes (a removed node counts as lost at once).
    #[serde(default = "default_rereplicate_after")]
    pub rereplicate_after_secs: u64,
}

impl Default for ImagesSection {
    fn default() -> Self {
        Self {
            replication: default_replication(),
            chunk_bytes: default_chunk_bytes(),
            max_image_bytes: default_max_image_bytes(),
            cache_bytes: default_cache_bytes(),
            cache_min_age_secs: default_cache_min_age(),
            rereplicate_after_secs: default_rereplicate_after(),
        }
    }
}

fn default_replication() -> usize {
    2
}
fn default_chunk_bytes() -> u64 {
    4 << 20
}
fn default_max_image_bytes() -> u64 {
    1 << 40
}
fn default_cache_bytes() -> u64 {
    50 << 30
}
fn default_cache_min_age() -> u64 {
    3600
}
fn default_rereplicate_after() -> u64 {
    300
}
