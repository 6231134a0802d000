//! Image data: `PUT /image/v2/images/{id}/file` and `GET` of the same.
//!
//! An upload claims the image (`queued` → `saving`, a compare-and-set naming this node), streams
//! the body through the chunking [`Uploader`](shoal_images::upload::Uploader) (memory: one
//! chunk, whatever the image size), then checks what arrived: the size and hashes the client
//! declared, and the content against `disk_format` (`shoal_disk::qcow2::check_upload`: no
//! backing file, no external data file, the format it claims). A refused upload leaves the image
//! `killed` with the reason in `shoal_upload_failure`; an interrupted one (the client went away,
//! this node's disk failed) puts it back to `queued` so the upload can be retried. A checked
//! upload becomes `active` in one transaction with its manifest and chunk holder rows, and the
//! staged file becomes this node's cached copy of the base image.
//!
//! While bytes flow the claim is refreshed every `CLAIM_HEARTBEAT_SECS`; an image whose claim
//! has not been refreshed for `CLAIM_STALE_SECS` (its node died) may be claimed by a new upload.

use shoal_state::tables;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures::{stream, StreamExt};
use shoal_disk::qcow2::{check_upload, DiskFormat, InspectError};
use shoal_types::{Expect, Op, Txn, MAX_TXN_ITEMS, MAX_VALUE_BYTES};
use tokio::io::AsyncReadExt;

use crate::api::error::{ApiError, ApiResult};
use crate::api::glance::images::{gerr, image_value, load_visible, load_writable, put_if};
use crate::api::{AppState, Auth};
use shoal_images::manifest;
use shoal_images::policy::image_caller;
use shoal_images::record::{ImageRecord, Status, UploadClaim, CLAIM_HEARTBEAT_SECS, HASH_ALGO};
use shoal_images::upload::{UploadError, Uploaded};
use shoal_state::time::now_secs;

/// Hashes a client may declare as image properties (openstacksdk sets them when it knows them).
const MD5_KEY: &str = "owner_specified.openstack.md5";
const SHA256_KEY: &str = "owner_specified.openstack.sha256";

/// An image this request holds in `saving`. Dropped while still armed (the handler returned
/// early or the connection was dropped mid-body), it puts the image back to `queued`.
struct Claim {
    state: AppState,
    img: ImageRecord,
    rev: u64,
    armed: bool,
}

impl Claim {
    /// Ends the claim with the image `queued` again (retry allowed) or `killed` with `reason`.
    async fn release(&mut self, status: Status, reason: Option<String>) {
        self.armed = false;
        let mut img = self.img.clone();
        img.status = status;
        img.upload = None;
        img.failure = reason;
        img.updated_at = now_secs();
        match put_if(&self.state, &img, self.rev).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::info!(image = %img.id, "image changed during the upload; left as is")
            }
            Err(e) => {
                tracing::warn!(image = %img.id, error = %e.message, "cannot end the upload claim")
            }
        }
    }

    /// Refuses the upload: the image is killed with `msg` as the reason, and the client gets
    /// `status` with the same message.
    async fn refuse(&mut self, status: StatusCode, msg: String) -> ApiError {
        tracing::info!(image = %self.img.id, reason = %msg, "upload refused");
        self.release(Status::Killed, Some(msg.clone())).await;
        ApiError::new(status, msg).glance()
    }

    /// Gives the image back to `queued` and answers `err`.
    async fn abandon(&mut self, err: ApiError) -> ApiError {
        tracing::warn!(image = %self.img.id, error = %err.message, "upload abandoned");
        self.release(Status::Queued, None).await;
        err.glance()
    }

    /// Refreshes the claim's heartbeat; an error if the image was deleted or taken over.
    async fn heartbeat(&mut self) -> ApiResult<()> {
        let mut img = self.img.clone();
        if let Some(c) = img.upload.as_mut() {
            c.heartbeat = now_secs();
        }
        match put_if(&self.state, &img, self.rev).await? {
            Some(rev) => {
                self.img = img;
                self.rev = rev;
                Ok(())
            }
            None => {
                self.armed = false;
                Err(lost(&img.id))
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.armed {
            let mut claim = Claim {
                state: self.state.clone(),
                img: self.img.clone(),
                rev: self.rev,
                armed: false,
            };
            tokio::spawn(async move { claim.release(Status::Queued, None).await });
        }
    }
}

fn lost(id: &str) -> ApiError {
    ApiError::conflict(format!(
        "image {id} was deleted or changed while its data was uploading; the data was discarded"
    ))
    .glance()
}

/// Whether images of this container format hold a disk as such (`bare`) or an Amazon-style
/// kernel, ramdisk or machine disk: those are checked against their disk format on upload and
/// may be booted. The others (`ovf`, `ova`, `docker`, `compressed`) are archives.
pub fn is_disk_container(container: &str) -> bool {
    matches!(container, "bare" | "ami" | "ari" | "aki")
}

/// A staged file removed on drop unless it was moved into the cache.
struct Staged(Option<PathBuf>);

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> ApiResult<Option<u64>> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request(format!("the {name} header is not a byte count")).glance()
            }),
    }
}

/// The size the client announces, from `X-OpenStack-Image-Size` (openstacksdk) or
/// `Content-Length`; the two must agree.
fn declared_size(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    let sdk = header_u64(headers, "x-openstack-image-size")?;
    let len = header_u64(headers, header::CONTENT_LENGTH.as_str())?;
    match (sdk, len) {
        (Some(a), Some(b)) if a != b => Err(ApiError::bad_request(format!(
            "X-OpenStack-Image-Size says {a} bytes but Content-Length says {b}"
        ))
        .glance()),
        (a, b) => Ok(a.or(b)),
    }
}

/// `Content-MD5` as hex, whether the client sent hex (as Glance does back) or base64 (RFC 1864).
fn content_md5(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("content-md5")?.to_str().ok()?.trim();
    if v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(v.to_ascii_lowercase());
    }
    STANDARD.decode(v).ok().map(hex::encode)
}

/// What is wrong with the bytes that arrived, judged against what the client declared.
fn declared_mismatch(
    img: &ImageRecord,
    up: &Uploaded,
    declared: Option<u64>,
    md5_header: Option<String>,
) -> Option<String> {
    if let Some(d) = declared.filter(|d| *d != up.manifest.size) {
        return Some(format!(
            "the client declared {d} bytes but {} arrived",
            up.manifest.size
        ));
    }
    let claims = [
        ("MD5 (Content-MD5)", md5_header, &up.md5),
        (
            "MD5 (property owner_specified.openstack.md5)",
            img.properties.get(MD5_KEY).cloned(),
            &up.md5,
        ),
        (
            "SHA-256 (property owner_specified.openstack.sha256)",
            img.properties.get(SHA256_KEY).cloned(),
            &up.manifest.sha256,
        ),
    ];
    claims.into_iter().find_map(|(what, want, have)| {
        let want = want.filter(|w| !w.is_empty())?;
        (!want.eq_ignore_ascii_case(have)).then(|| {
            format!("hash mismatch: the client declared {what} {want}, the data has {have}")
        })
    })
}

/// The ops activating the upload. They go in one transaction with the image's status change
/// when they fit; holder rows that do not fit are written first, as they only state that a
/// node holds a chunk, which is true whether or not the image activates.
fn split_ops(ops: Vec<Op>) -> (Vec<Vec<Op>>, Vec<Op>) {
    let room = MAX_TXN_ITEMS - 2;
    if ops.len() <= room {
        return (Vec::new(), ops);
    }
    let (holders, rest): (Vec<Op>, Vec<Op>) = ops
        .into_iter()
        .partition(|op| op.table() == manifest::HOLDERS);
    let mut batches: Vec<Vec<Op>> = holders.chunks(MAX_TXN_ITEMS).map(<[Op]>::to_vec).collect();
    let last = if rest.len() < room {
        let fill = room - rest.len();
        let tail = batches.pop().unwrap_or_default();
        let keep = tail.len().saturating_sub(fill);
        let (early, late) = tail.split_at(keep);
        if !early.is_empty() {
            batches.push(early.to_vec());
        }
        rest.into_iter().chain(late.iter().cloned()).collect()
    } else {
        rest
    };
    (batches, last)
}

pub async fn upload(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let (img, rev) = load_writable(&state, &auth, &id).await?;
    let declared = declared_size(&headers)?;
    let md5_header = content_md5(&headers);
    ingest(
        &state,
        img,
        rev,
        body.into_data_stream(),
        declared,
        md5_header,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Takes a file of this node into a `queued` image through the same path an upload takes
/// (claim, chunks, replicas, hashes, the inspector, activation), on the cloud's own behalf:
/// the compute agent's snapshots. The image gets `disk_format` and the `bare` container as it
/// is claimed; a refusal leaves it `killed`, an interruption `queued`, as for any upload.
pub(crate) async fn ingest_file(
    state: &AppState,
    id: &str,
    path: &std::path::Path,
    disk_format: &str,
) -> ApiResult<()> {
    let (mut img, rev) = crate::api::glance::images::load(state, id).await?;
    if img.status == Status::Queued {
        img.disk_format = Some(disk_format.to_owned());
        img.container_format = Some("bare".to_owned());
    }
    let file = tokio::fs::File::open(path).await.map_err(|e| {
        tracing::error!(image = %id, path = %path.display(), error = %e, "cannot open a snapshot");
        ApiError::internal("this node could not read the image it was to store").glance()
    })?;
    let size = file.metadata().await.ok().map(|m| m.len());
    let data = stream::try_unfold(file, |mut f| async move {
        let mut buf = BytesMut::with_capacity(1 << 20);
        let n = f.read_buf(&mut buf).await?;
        Ok::<_, std::io::Error>((n > 0).then(|| (buf.freeze(), f)))
    });
    ingest(state, img, rev, Box::pin(data), size, None).await
}

/// The upload proper, once the caller may write `img` (read at `rev`): `data` is the image,
/// `declared` the size and `md5_header` the MD5 the uploader announced.
async fn ingest<E: std::fmt::Display>(
    state: &AppState,
    img: ImageRecord,
    rev: u64,
    data: impl futures::Stream<Item = Result<Bytes, E>> + Unpin,
    declared: Option<u64>,
    md5_header: Option<String>,
) -> ApiResult<()> {
    let state = state.clone();
    let id = img.id.clone();
    let now = now_secs();
    match (&img.status, &img.upload) {
        (Status::Queued, _) => {}
        (Status::Saving, Some(c)) if !c.is_stale(now) => {
            return Err(ApiError::conflict(format!(
                "image {id} is already being uploaded through node {}; retry if that upload fails",
                c.node
            ))
            .glance())
        }
        (Status::Saving, _) => {
            tracing::info!(image = %id, "taking over an upload whose node stopped refreshing it")
        }
        (s, _) => {
            return Err(ApiError::conflict(format!(
                "image {id} is {}: data can be uploaded only to a queued image",
                s.as_str()
            ))
            .glance())
        }
    }
    let (Some(disk_format), Some(container)) = (&img.disk_format, &img.container_format) else {
        return Err(ApiError::bad_request(
            "set disk_format and container_format before uploading data",
        )
        .glance());
    };
    let format: DiskFormat = disk_format
        .parse()
        .map_err(|e: InspectError| ApiError::bad_request(e.to_string()).glance())?;
    // An ova, ovf, docker or compressed container is an archive, not a disk: its bytes are
    // stored unjudged (as Glance does) and no server boots from it (`nova::servers`).
    let inspect = is_disk_container(container);
    let limit = state.images.settings.max_image_bytes;

    let mut saving = img.clone();
    saving.status = Status::Saving;
    saving.failure = None;
    saving.updated_at = now;
    saving.upload = Some(UploadClaim {
        node: state.images.node_name().to_owned(),
        started: now,
        heartbeat: now,
    });
    let rev = put_if(&state, &saving, rev).await?.ok_or_else(|| {
        ApiError::conflict(format!("image {id} changed as the upload began; retry")).glance()
    })?;
    let mut claim = Claim {
        state: state.clone(),
        img: saving,
        rev,
        armed: true,
    };
    if let Some(d) = declared.filter(|d| *d > limit) {
        return Err(claim
            .refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the image is {d} bytes, over this cloud's {limit}-byte limit"),
            )
            .await);
    }

    let mut uploader = match state.images.uploader(&id).await {
        Ok(u) => u,
        Err(e) => return Err(claim.abandon(ApiError::internal_logged(&e)).await),
    };
    let mut data = data;
    let mut beat = tokio::time::interval(Duration::from_secs(CLAIM_HEARTBEAT_SECS));
    beat.tick().await;
    loop {
        tokio::select! {
            piece = data.next() => match piece {
                None => break,
                Some(Ok(bytes)) => match uploader.push(bytes).await {
                    Ok(()) => {}
                    Err(UploadError::TooLarge { limit }) => {
                        let msg = format!("the image is larger than this cloud's {limit}-byte limit");
                        return Err(claim.refuse(StatusCode::PAYLOAD_TOO_LARGE, msg).await);
                    }
                    Err(e) => return Err(claim.abandon(ApiError::internal_logged(&e)).await),
                },
                Some(Err(e)) => {
                    let err = ApiError::bad_request(format!("the upload was interrupted: {e}"));
                    return Err(claim.abandon(err).await);
                }
            },
            _ = beat.tick() => claim.heartbeat().await?,
        }
    }
    let up = match uploader.finish().await {
        Ok(up) => up,
        Err(e) => return Err(claim.abandon(ApiError::internal_logged(&e)).await),
    };
    let mut staged = Staged(Some(up.staging.clone()));
    if let Some(msg) = declared_mismatch(&claim.img, &up, declared, md5_header) {
        return Err(claim.refuse(StatusCode::BAD_REQUEST, msg).await);
    }
    let ops = manifest::record_ops(&id, &up.manifest, &up.copies);
    if ops
        .iter()
        .any(|op| matches!(op, Op::Put { value, .. } if value.len() > MAX_VALUE_BYTES))
    {
        let msg = format!(
            "the image's {} chunks do not fit in one manifest row; images of more than about {} bytes need a larger [images] chunk_bytes",
            up.manifest.chunks.len(),
            // A chunk takes 67 bytes of the manifest's JSON: 64 hex digits, quotes, a comma.
            (MAX_VALUE_BYTES as u64 / 67) * up.manifest.chunk_size
        );
        return Err(claim.refuse(StatusCode::PAYLOAD_TOO_LARGE, msg).await);
    }
    let path = up.staging.clone();
    let checked = tokio::task::spawn_blocking(move || {
        inspect.then(|| check_upload(&path, format)).transpose()
    });
    let virtual_size = match checked.await {
        Ok(Ok(info)) => info.map(|i| i.virtual_size),
        Ok(Err(e @ InspectError::Io { .. })) => {
            tracing::error!(image = %id, error = %e, "cannot read the staged upload");
            let err = ApiError::internal("this node could not read back the uploaded data");
            return Err(claim.abandon(err).await);
        }
        Ok(Err(e)) => {
            let msg = format!("the data is not a valid {disk_format} image: {e}");
            return Err(claim.refuse(StatusCode::BAD_REQUEST, msg).await);
        }
        Err(_) => {
            let err = ApiError::internal("the image inspector stopped");
            return Err(claim.abandon(err).await);
        }
    };

    // This node keeps the checked file as its cached copy. A rename: the cache never holds a
    // partial file. Downloads serve it only once the image is active.
    let cache = state.images.cache_path(&id);
    let (from, to) = (up.staging.clone(), cache.clone());
    match tokio::task::spawn_blocking(move || std::fs::rename(from, to)).await {
        Ok(Ok(())) => staged.0 = None,
        other => tracing::warn!(image = %id, result = ?other, "cannot cache the uploaded image"),
    }

    let mut active = claim.img.clone();
    active.status = Status::Active;
    active.upload = None;
    active.size = Some(up.manifest.size);
    active.virtual_size = virtual_size;
    active.checksum = Some(up.md5.clone());
    active.os_hash_algo = Some(HASH_ALGO.into());
    active.os_hash_value = Some(up.sha512.clone());
    active.updated_at = now_secs();
    let (early, ops) = split_ops(ops);
    for batch in early {
        let txn = Txn {
            preconditions: Vec::new(),
            ops: batch,
        };
        if let Err(e) = state.cluster.write(txn).await {
            return Err(claim.abandon(e.into()).await);
        }
    }
    let mut txn = Txn::new()
        .when(tables::IMAGES, &id, Expect::Revision(claim.rev))
        .put(tables::IMAGES, &id, image_value(&active));
    txn.ops.extend(ops);
    let committed = match state.cluster.write(txn).await {
        Ok(resp) => resp.succeeded,
        Err(e) => {
            let _ = std::fs::remove_file(&cache);
            return Err(claim.abandon(e.into()).await);
        }
    };
    claim.armed = false;
    if !committed {
        let _ = std::fs::remove_file(&cache);
        return Err(lost(&id));
    }
    tracing::info!(image = %id, size = up.manifest.size, chunks = up.manifest.chunks.len(), "image active");
    Ok(())
}

pub async fn download(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (img, _) = load_visible(&state, &auth, &id).await?;
    match img.status {
        Status::Active => {}
        Status::Deactivated if image_caller(&auth.0).admin => {}
        Status::Deactivated => {
            return Err(ApiError::forbidden(format!(
                "image {id} is deactivated: only an admin may download its data until it is reactivated"
            ))
            .glance())
        }
        // Glance answers 204 for an image without data.
        Status::Queued | Status::Saving => return Ok(StatusCode::NO_CONTENT.into_response()),
        Status::Killed => {
            return Err(ApiError::conflict(format!(
                "image {id} has no data: its upload was refused ({})",
                img.failure.as_deref().unwrap_or("no reason recorded")
            ))
            .glance())
        }
    }
    let size = img.size.unwrap_or(0);
    let body = match cached(&state, &id, size).await {
        Some(file) => Body::from_stream(stream::try_unfold(file, |mut f| async move {
            let mut buf = BytesMut::with_capacity(256 << 10);
            let n = f.read_buf(&mut buf).await?;
            Ok::<_, std::io::Error>((n > 0).then(|| (buf.freeze(), f)))
        })),
        None => from_chunks(&state, &id).await?,
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Some(v) = img.checksum.as_deref().and_then(|c| c.parse().ok()) {
        h.insert("content-md5", v);
    }
    Ok(resp)
}

/// This node's cached copy, if it has a complete one.
async fn cached(state: &AppState, id: &str, size: u64) -> Option<tokio::fs::File> {
    let file = tokio::fs::File::open(state.images.cache_path(id))
        .await
        .ok()?;
    let len = file.metadata().await.ok()?.len();
    (len == size).then_some(file)
}

/// The image's chunks in manifest order, each checked against its hash as it is read. The
/// first is read before answering, so an image whose chunks cannot be reached gets an error
/// status rather than a cut-off body; a later failure aborts the body mid-stream, which the
/// client sees as a short read against Content-Length, never as a complete file.
async fn from_chunks(state: &AppState, id: &str) -> ApiResult<Body> {
    let m = manifest::load(&state.cluster, id)
        .await
        .map_err(gerr)?
        .ok_or_else(|| {
            ApiError::internal(format!("image {id} is active but has no manifest")).glance()
        })?;
    let digests = m
        .digests()
        .map_err(|e| ApiError::internal_logged(&e).glance())?;
    let Some(first) = digests.first().copied() else {
        return Ok(Body::empty());
    };
    let first = state.images.read_chunk(first).await.map_err(|e| {
        ApiError::unavailable(format!("the data of image {id} cannot be read: {e}")).glance()
    })?;
    let store = state.images.clone();
    let image = id.to_owned();
    let rest = stream::iter(digests.into_iter().skip(1)).then(move |d| {
        let store = store.clone();
        let image = image.clone();
        async move {
            store.read_chunk(d).await.inspect_err(
                |e| tracing::warn!(image = %image, chunk = %d, error = %e, "download cut short"),
            )
        }
    });
    Ok(Body::from_stream(
        stream::once(async move { Ok::<Bytes, _>(first) }).chain(rest),
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn holder(i: usize) -> Op {
        Op::Put {
            table: manifest::HOLDERS.into(),
            key: format!("{i}"),
            value: Vec::new(),
        }
    }

    #[test]
    fn activation_ops_fit_in_transactions() {
        let manifest_op = Op::Put {
            table: manifest::MANIFESTS.into(),
            key: "img".into(),
            value: Vec::new(),
        };
        let small: Vec<Op> = std::iter::once(manifest_op.clone())
            .chain((0..10).map(holder))
            .collect();
        let (early, last) = split_ops(small.clone());
        assert!(early.is_empty());
        assert_eq!(last, small);

        let n = 3 * MAX_TXN_ITEMS;
        let big: Vec<Op> = std::iter::once(manifest_op.clone())
            .chain((0..n).map(holder))
            .collect();
        let (early, last) = split_ops(big);
        assert!(early
            .iter()
            .all(|b| b.len() <= MAX_TXN_ITEMS && !b.is_empty()));
        assert!(last.len() <= MAX_TXN_ITEMS - 2);
        assert!(last.contains(&manifest_op));
        let total: usize = early.iter().map(Vec::len).sum::<usize>() + last.len();
        assert_eq!(total, n + 1);
    }

    #[test]
    fn declared_sizes_must_agree() {
        let mut h = HeaderMap::new();
        assert_eq!(declared_size(&h).unwrap(), None);
        h.insert("content-length", HeaderValue::from(10u64));
        assert_eq!(declared_size(&h).unwrap(), Some(10));
        h.insert("x-openstack-image-size", HeaderValue::from(11u64));
        assert!(declared_size(&h).is_err());
        h.insert("x-openstack-image-size", HeaderValue::from_static("ten"));
        assert!(declared_size(&h).is_err());
    }

    #[test]
    fn what_the_client_declared_must_match_the_data() {
        let body = json!({"name": "x", MD5_KEY: "", SHA256_KEY: ""});
        let caller = shoal_images::record::Caller {
            admin: false,
            project: Some("p".into()),
        };
        let mut img = ImageRecord::create(&body, &caller, 0, || "i".into()).unwrap();
        let up = Uploaded {
            manifest: manifest::Manifest {
                size: 3,
                chunk_size: 4,
                chunks: vec!["c".into()],
                sha256: "5h4".into(),
            },
            md5: "abc".into(),
            sha512: "5h5".into(),
            staging: PathBuf::new(),
            copies: Vec::new(),
        };
        // Empty declarations (what openstacksdk sends by default) are no declaration.
        assert_eq!(declared_mismatch(&img, &up, Some(3), None), None);
        assert!(declared_mismatch(&img, &up, Some(4), None)
            .unwrap()
            .contains("declared 4 bytes but 3 arrived"));
        assert!(declared_mismatch(&img, &up, None, Some("abd".into()))
            .unwrap()
            .contains("Content-MD5"));
        assert_eq!(declared_mismatch(&img, &up, None, Some("ABC".into())), None);
        img.properties.insert(SHA256_KEY.into(), "other".into());
        assert!(declared_mismatch(&img, &up, None, None)
            .unwrap()
            .contains("SHA-256"));
    }

    #[test]
    fn content_md5_in_hex_or_base64() {
        let mut h = HeaderMap::new();
        let hexd = "9e107d9d372bb6826bd81d3542a419d6";
        h.insert("content-md5", HeaderValue::from_static(hexd));
        assert_eq!(content_md5(&h).as_deref(), Some(hexd));
        let b64 = STANDARD.encode(hex::decode(hexd).unwrap());
        h.insert("content-md5", b64.parse().unwrap());
        assert_eq!(content_md5(&h).as_deref(), Some(hexd));
    }
}
