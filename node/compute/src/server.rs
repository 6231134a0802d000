//! The server record (Nova's instance) and its states.
//!
//! One row per server in the `servers` table, keyed by the server's uuid. The API writes what
//! a user asks for by setting a `task_state` (as Nova's API does before it casts to the compute
//! service); the compute agent of the server's host sees the row change on its watch, does the
//! work, and writes the outcome with the task cleared. The row is the only message: there is no
//! queue, and a node that restarts finds every pending task in the rows themselves.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::ComputeError;

/// Nova's `vm_state`: what the server is, as far as the cloud knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Building,
    Active,
    Stopped,
    Paused,
    Suspended,
    Error,
    Deleted,
    /// Stopped, its root disk saved as an image (`shelve`), still on its host.
    Shelved,
    /// Shelved and gone from its host: no domain, no claim, no host (`shelveOffload`).
    #[serde(rename = "shelved_offloaded")]
    ShelvedOffloaded,
    /// Booted from a rescue image with its own disk attached second (`rescue`).
    Rescued,
    /// Resized or migrated to its new host, waiting for `confirmResize` or `revertResize`.
    Resized,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Building => "building",
            VmState::Active => "active",
            VmState::Stopped => "stopped",
            VmState::Paused => "paused",
            VmState::Suspended => "suspended",
            VmState::Error => "error",
            VmState::Deleted => "deleted",
            VmState::Shelved => "shelved",
            VmState::ShelvedOffloaded => "shelved_offloaded",
            VmState::Rescued => "rescued",
            VmState::Resized => "resized",
        }
    }
}

/// Nova's `task_state`: the change in progress, if any. The agent clears it when done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    Scheduling,
    Spawning,
    PoweringOff,
    PoweringOn,
    Rebooting,
    RebootingHard,
    Pausing,
    Unpausing,
    Suspending,
    Resuming,
    /// The server's disk is rewritten from a (maybe new) image and the domain defined again.
    Rebuilding,
    Deleting,
    /// `createImage`: the API created the image; the agent has not taken the task up yet.
    ImageSnapshot,
    /// `createBackup`: as `ImageSnapshot`, then the server's older backups are rotated.
    ImageBackup,
    /// The agent is flattening the root disk into a standalone image.
    ImagePendingUpload,
    /// The flattened image is going into the Image API's upload path.
    ImageUploading,
    /// `shelve`: power off, snapshot, then (with `shelved_offload_time` 0) offload.
    Shelving,
    ShelvingImagePendingUpload,
    ShelvingImageUploading,
    /// `shelveOffload`: the domain and its disks go, the claim is released.
    ShelvingOffloading,
    /// `unshelve`: placed again (or still on its host), spawned from the shelve image.
    Unshelving,
    /// `rescue`: the domain is booted again from the rescue image, its disk second.
    Rescuing,
    /// `unrescue`: the rescue domain goes and the server's own domain comes back.
    Unrescuing,
    /// `resize`/`migrate`: the API placed the target and claimed the new flavor there; the
    /// source host has not taken the task up yet.
    #[serde(rename = "resize_prep")]
    ResizePrep,
    /// The source host powers the domain off and sets its disks aside.
    #[serde(rename = "resize_migrating")]
    ResizeMigrating,
    /// The disks are ready to be pulled by the target host.
    #[serde(rename = "resize_migrated")]
    ResizeMigrated,
    /// The target host pulls the disks, grows the root disk and starts the domain.
    #[serde(rename = "resize_finish")]
    ResizeFinish,
    /// `revertResize`: the target host drops its copy, then the source starts the original.
    #[serde(rename = "resize_reverting")]
    ResizeReverting,
    /// `confirmResize` (or the confirm window passed): the source drops its copy and claim.
    #[serde(rename = "resize_confirming")]
    ResizeConfirming,
}

impl TaskState {
    /// The spelling Nova's API shows in `OS-EXT-STS:task_state`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Scheduling => "scheduling",
            TaskState::Spawning => "spawning",
            TaskState::PoweringOff => "powering-off",
            TaskState::PoweringOn => "powering-on",
            TaskState::Rebooting => "rebooting",
            TaskState::RebootingHard => "rebooting_hard",
            TaskState::Pausing => "pausing",
            TaskState::Unpausing => "unpausing",
            TaskState::Suspending => "suspending",
            TaskState::Resuming => "resuming",
            TaskState::Rebuilding => "rebuilding",
            TaskState::Deleting => "deleting",
            TaskState::ImageSnapshot => "image_snapshot",
            TaskState::ImageBackup => "image_backup",
            TaskState::ImagePendingUpload => "image_pending_upload",
            TaskState::ImageUploading => "image_uploading",
            TaskState::Shelving => "shelving",
            TaskState::ShelvingImagePendingUpload => "shelving_image_pending_upload",
            TaskState::ShelvingImageUploading => "shelving_image_uploading",
            TaskState::ShelvingOffloading => "shelving_offloading",
            TaskState::Unshelving => "unshelving",
            TaskState::Rescuing => "rescuing",
            TaskState::Unrescuing => "unrescuing",
            TaskState::ResizePrep => "resize_prep",
            TaskState::ResizeMigrating => "resize_migrating",
            TaskState::ResizeMigrated => "resize_migrated",
            TaskState::ResizeFinish => "resize_finish",
            TaskState::ResizeReverting => "resize_reverting",
            TaskState::ResizeConfirming => "resize_confirming",
        }
    }

    /// The tasks of a resize or migration on its way to the target (status RESIZE).
    pub fn is_resizing(self) -> bool {
        matches!(
            self,
            TaskState::ResizePrep
                | TaskState::ResizeMigrating
                | TaskState::ResizeMigrated
                | TaskState::ResizeFinish
        )
    }
}

/// Nova's power states, with its integer values.
pub mod power {
    pub const NOSTATE: u8 = 0;
    pub const RUNNING: u8 = 1;
    pub const PAUSED: u8 = 3;
    pub const SHUTDOWN: u8 = 4;
    pub const CRASHED: u8 = 6;
    pub const SUSPENDED: u8 = 7;
}

/// What the server was created with, copied from the flavor so that a later flavor change or
/// delete does not change a running server (Nova embeds the flavor in the instance too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlavorSnapshot {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub ram_mb: u64,
    pub disk_gb: u64,
    #[serde(default)]
    pub ephemeral_gb: u64,
    #[serde(default)]
    pub swap_mb: u64,
    #[serde(default)]
    pub extra_specs: BTreeMap<String, String>,
}

/// What the agent needs of the image, copied at create time: the agent reads the bytes from
/// the node's image cache and never the image record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSnapshot {
    pub id: String,
    /// `raw` or `qcow2` for a disk image the overlay sits on; `aki`/`ari`/`ami` otherwise.
    pub disk_format: String,
    /// Direct kernel boot: Glance AMI-style `kernel_id` and `ramdisk_id` properties.
    #[serde(default)]
    pub kernel_id: Option<String>,
    #[serde(default)]
    pub ramdisk_id: Option<String>,
    /// The kernel command line (`os_command_line` property), when the image gives one.
    #[serde(default)]
    pub kernel_cmdline: Option<String>,
}

/// A NIC of the server: a port of the Network API (the `ports` table), as the server uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerPort {
    pub port_id: String,
    pub network_id: String,
    pub network_name: String,
    pub mac: String,
    pub ips: Vec<String>,
    pub mtu: u32,
    /// The servers API created the port for this server (and deletes it with the server);
    /// otherwise the user passed an existing port, which is only unbound at the end.
    #[serde(default)]
    pub created: bool,
}

/// Why a server is in ERROR, shown as Nova's `fault`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub code: u16,
    pub message: String,
    /// RFC 3339, UTC.
    pub created: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub user_id: String,
    pub flavor: FlavorSnapshot,
    pub image: ImageSnapshot,
    #[serde(default)]
    pub key_name: Option<String>,
    /// The public key, copied from the keypair for the metadata service.
    #[serde(default)]
    pub key_data: Option<String>,
    /// Base64 as the API received it (at most 64 KiB decoded).
    #[serde(default)]
    pub user_data: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// The server's NICs, in the order the guest sees them.
    #[serde(default)]
    pub ports: Vec<ServerPort>,
    pub availability_zone: String,
    /// The compute host the server is placed on; `None` until placed (or when no host fit).
    #[serde(default)]
    pub host: Option<String>,
    pub vm_state: VmState,
    #[serde(default)]
    pub task_state: Option<TaskState>,
    pub power_state: u8,
    #[serde(default)]
    pub fault: Option<Fault>,
    /// Index within a multi-create (`min_count`/`max_count`) request, and its reservation id.
    #[serde(default)]
    pub launch_index: u32,
    #[serde(default)]
    pub reservation_id: String,
    /// Libvirt's domain name, `instance-%08x` of a number unique in the cluster (the create
    /// revision of the row, known once the row is written; Nova uses the database id).
    #[serde(default)]
    pub instance_name: Option<String>,
    pub created: String,
    pub updated: String,
    #[serde(default)]
    pub launched_at: Option<String>,
    /// The addresses a user says the server is reached at (`accessIPv4`/`accessIPv6`):
    /// informational, as in Nova.
    #[serde(default)]
    pub access_ipv4: String,
    #[serde(default)]
    pub access_ipv6: String,
    /// Locked (the `lock` action): only an admin may act on it until `unlock`.
    #[serde(default)]
    pub locked: bool,
    /// Nova's `display_description` (shown from microversion 2.19): the name when the server
    /// was created below 2.19, as Nova sets it; `None` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A `trigger_crash_dump` (microversion 2.17) the host's agent has yet to carry out: the
    /// request id of its action. The agent injects an NMI, records the action's event and
    /// clears it; like Nova's, the request sets no task state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_dump: Option<String>,
    /// Nova's `config_drive`: the guest gets a config drive (asked for on create, or set by
    /// the agent of a host with `[compute] force_config_drive`).
    #[serde(default)]
    pub config_drive: bool,
    /// The action log (`os-instance-actions`), oldest first; at most [`MAX_ACTIONS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<InstanceAction>,
    /// The image a `createImage` or `shelve` in progress writes: the API creates it `queued`
    /// and names it here (Nova hands its id to the compute manager in the cast).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_image: Option<String>,
    /// What `shelve` left, as Nova's `shelved_image_id`/`shelved_at`/`shelved_host` system
    /// metadata; gone again once the server is unshelved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shelved: Option<Shelved>,
    /// The rotation a `createBackup` in progress asks for (Nova passes it in the cast); gone
    /// once the backup is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<Backup>,
    /// A rescue in progress or in place: the image the rescue domain boots from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescue: Option<ImageSnapshot>,
    /// The resize or cold migration in progress (from `resize`/`migrate` until it is confirmed
    /// or reverted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// Finished migrations (confirmed, reverted or failed), newest last, at most
    /// [`MAX_MIGRATIONS`]: what `os-migrations` lists besides the ones in progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub past_migrations: Vec<Migration>,
    /// Nova's server tags (microversion 2.26), in tag order as Nova's table keys them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub tags: BTreeSet<String>,
}

/// Checks a list of tags as Nova's `tags` schema does: at most [`MAX_TAGS`], each a valid tag.
pub fn check_tag_list(tags: &[String]) -> Result<(), ComputeError> {
    let field = |e: String| {
        ComputeError::BadRequest(format!("Invalid input for field/attribute tags. {e}"))
    };
    if tags.len() > MAX_TAGS {
        return Err(field(format!(
            "The list has {} tags, more than {MAX_TAGS}",
            tags.len()
        )));
    }
    for t in tags {
        check_tag(t).map_err(field)?;
    }
    Ok(())
}

/// Nova's per-server tag limit (`objects.instance.MAX_TAG_COUNT`).
pub const MAX_TAGS: usize = 50;

/// Checks a tag as Nova's schema does: 1 to 60 characters, none of them `,` or `/`. The error
/// is what is wrong, for the caller to put in its own message.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let len = tag.chars().count();
    if len == 0 {
        Err(format!("'{tag}' is too short"))
    } else if len > 60 {
        Err(format!("'{tag}' is too long"))
    } else if tag.contains([',', '/']) {
        Err(format!("'{tag}' does not match '^[^,/]*$'"))
    } else {
        Ok(())
    }
}

/// The tag filters of a server list (2.26), each a set of tags: `tags` (all of them),
/// `tags-any` (one of them), `not-tags` (not all of them) and `not-tags-any` (none of them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagFilter {
    pub all: Vec<String>,
    pub any: Vec<String>,
    pub not_all: Vec<String>,
    pub not_any: Vec<String>,
}

impl TagFilter {
    /// Whether a server tagged `tags` passes every filter given (an empty one is not given).
    pub fn matches(&self, tags: &BTreeSet<String>) -> bool {
        let has = |t: &String| tags.contains(t);
        self.all.iter().all(has)
            && (self.any.is_empty() || self.any.iter().any(has))
            && (self.not_all.is_empty() || !self.not_all.iter().all(has))
            && !self.not_any.iter().any(has)
    }
}

/// A `createBackup`'s type and rotation: once the backup is uploaded, only the newest
/// `rotation` backups of this server and type are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    pub backup_type: String,
    pub rotation: u64,
}

/// How many finished migrations a server's row keeps.
pub const MAX_MIGRATIONS: usize = 20;

/// A resize or cold migration, as Nova's `migrations` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Nova's integer id: the Raft revision of the server's row when it was asked for.
    pub id: u64,
    /// `resize`, `migration` or `evacuation` (Nova's `migration_type`).
    pub kind: String,
    pub source_host: String,
    pub dest_host: String,
    pub old_flavor: FlavorSnapshot,
    pub new_flavor: FlavorSnapshot,
    /// Nova's statuses: pre-migrating, migrating, post-migrating, finished, confirming,
    /// confirmed, reverting, reverted, error; an evacuation's: accepted (placed, the target
    /// rebuilding), done or failed (the target's outcome), completed (the source removed its
    /// copy), error (no host fit).
    pub status: String,
    /// What the server was before (`active` or `stopped`): a revert and a confirm go back to it.
    pub old_vm_state: VmState,
    /// RFC 3339, UTC.
    pub created: String,
    pub updated: String,
    /// A revert's first half is done: the target dropped its copy and its claim, and the row
    /// names the source again.
    #[serde(default)]
    pub dest_released: bool,
}

/// The `migration_type` of an evacuation.
pub const EVACUATION: &str = "evacuation";

impl Migration {
    /// Whether this is an evacuation from `host` whose copy there is still to be removed
    /// (Nova's `_destroy_evacuated_instances` looks for `accepted`, `pre-migrating` and `done`
    /// ones; a `failed` rebuild leaves the source's copy, an `error` one was never placed).
    pub fn evacuated_from(&self, host: &str) -> bool {
        self.kind == EVACUATION
            && self.source_host == host
            && matches!(self.status.as_str(), "accepted" | "pre-migrating" | "done")
    }

    /// The key of the target's claim in the `instances` table (the server's own claim, on
    /// the source, is keyed by its uuid until the resize is confirmed).
    pub fn claim_key(server: &str) -> String {
        format!("{server}.migration")
    }
}

/// A shelved server's image and when it was shelved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shelved {
    /// The `<name>-shelved` snapshot its disk was saved to.
    pub image_id: String,
    /// RFC 3339, UTC.
    pub at: String,
    /// The host it was shelved on.
    pub host: String,
}

impl ServerRecord {
    /// Keeps a finished migration in the row's history (the newest [`MAX_MIGRATIONS`]).
    pub fn keep_past_migration(&mut self, m: Migration) {
        self.past_migrations.push(m);
        if self.past_migrations.len() > MAX_MIGRATIONS {
            let extra = self.past_migrations.len() - MAX_MIGRATIONS;
            self.past_migrations.drain(..extra);
        }
    }

    /// Whether `host` holds a copy of this server that an evacuation left behind and is to
    /// remove: the server is placed elsewhere, no resize involves it, and an evacuation from
    /// `host` is still to be completed.
    pub fn evacuated_from(&self, host: &str) -> bool {
        self.host.as_deref() != Some(host)
            && self.migration.as_ref().is_none_or(|m| m.kind == EVACUATION)
            && self
                .migration
                .iter()
                .chain(&self.past_migrations)
                .any(|m| m.evacuated_from(host))
    }

    /// Refuses a tag change (`action`, in Nova's words) unless the server is active, paused,
    /// suspended or stopped, as Nova does (409).
    pub fn check_tags_editable(&self, action: &str) -> Result<(), ComputeError> {
        if matches!(
            self.vm_state,
            VmState::Active | VmState::Paused | VmState::Suspended | VmState::Stopped
        ) {
            Ok(())
        } else {
            Err(ComputeError::Conflict(format!(
                "Cannot '{action}' instance {} while it is in vm_state {}",
                self.id,
                self.vm_state.as_str()
            )))
        }
    }

    /// Adds `tag`; whether it was new. Beyond [`MAX_TAGS`] it is a 400 as in Nova.
    pub fn add_tag(&mut self, tag: &str) -> Result<bool, ComputeError> {
        self.check_tags_editable("update tag")?;
        check_tag(tag).map_err(|e| {
            ComputeError::BadRequest(format!(
                "Tag '{tag}' is invalid. It must be a non empty string without characters '/' \
                 and ','. Validation error message: {e}"
            ))
        })?;
        if self.tags.len() >= MAX_TAGS {
            return Err(ComputeError::BadRequest(format!(
                "The number of tags exceeded the per-server limit {MAX_TAGS}"
            )));
        }
        Ok(self.tags.insert(tag.to_owned()))
    }

    /// Replaces the tags with `tags` (duplicates collapse, as in Nova's table).
    pub fn set_tags(&mut self, tags: &[String]) -> Result<(), ComputeError> {
        self.check_tags_editable("update tags")?;
        check_tag_list(tags)?;
        self.tags = tags.iter().cloned().collect();
        Ok(())
    }

    /// Removes `tag`; 404 when the server does not have it.
    pub fn remove_tag(&mut self, tag: &str) -> Result<(), ComputeError> {
        self.check_tags_editable("delete tag")?;
        if self.tags.remove(tag) {
            Ok(())
        } else {
            Err(ComputeError::NotFound(format!(
                "Instance {} has no tag '{tag}'",
                self.id
            )))
        }
    }

    /// Removes every tag.
    pub fn clear_tags(&mut self) -> Result<(), ComputeError> {
        self.check_tags_editable("delete tags")?;
        self.tags.clear();
        Ok(())
    }

    /// Nova's `status`, derived from `vm_state` and `task_state` as Nova's API derives it.
    pub fn status(&self) -> &'static str {
        if self.task_state == Some(TaskState::Rebuilding)
            && matches!(
                self.vm_state,
                VmState::Active | VmState::Stopped | VmState::Error
            )
        {
            return "REBUILD";
        }
        if matches!(self.vm_state, VmState::Active | VmState::Stopped)
            && self.task_state.is_some_and(TaskState::is_resizing)
        {
            return "RESIZE";
        }
        match self.vm_state {
            VmState::Building => "BUILD",
            VmState::Error => "ERROR",
            VmState::Deleted => "DELETED",
            VmState::Stopped => "SHUTOFF",
            VmState::Paused => "PAUSED",
            VmState::Suspended => "SUSPENDED",
            VmState::Shelved => "SHELVED",
            VmState::ShelvedOffloaded => "SHELVED_OFFLOADED",
            VmState::Rescued => "RESCUE",
            VmState::Resized => match self.task_state {
                Some(TaskState::ResizeReverting) => "REVERT_RESIZE",
                _ => "VERIFY_RESIZE",
            },
            VmState::Active => match self.task_state {
                Some(TaskState::Rebooting) => "REBOOT",
                Some(TaskState::RebootingHard) => "HARD_REBOOT",
                _ => "ACTIVE",
            },
        }
    }
}

/// `instance-%08x`, Nova's default `instance_name_template`.
pub fn instance_name(number: u64) -> String {
    format!("instance-{number:08x}")
}

/// What a user may ask of a server through `POST /servers/{id}/action`, and the task each one
/// starts. `None` means the state forbids it (Nova answers 409).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Stop,
    Start,
    Reboot {
        hard: bool,
    },
    Pause,
    Unpause,
    Suspend,
    Resume,
    /// The disk rewritten from the record's image (the API sets the new image first).
    Rebuild,
    Delete,
    /// `createImage`: the root disk saved as a new image.
    CreateImage,
    /// `createBackup`: a snapshot kept as a backup, older backups rotated.
    CreateBackup,
    Shelve,
    ShelveOffload,
    Unshelve,
    Rescue,
    Unrescue,
    /// `resize` (a new flavor) and `migrate` (the same flavor, another host).
    Resize,
    Migrate,
    ConfirmResize,
    RevertResize,
    /// `evacuate` (admins): rebuilt on another host from its image, its own host being down.
    Evacuate,
}

impl Action {
    /// The name Nova's instance-action log and its 409 messages give the action.
    pub fn name(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Reboot { .. } => "reboot",
            Action::Pause => "pause",
            Action::Unpause => "unpause",
            Action::Suspend => "suspend",
            Action::Resume => "resume",
            Action::Rebuild => "rebuild",
            Action::Delete => "delete",
            Action::CreateImage => "createImage",
            Action::CreateBackup => "createBackup",
            Action::Shelve => "shelve",
            Action::ShelveOffload => "shelveOffload",
            Action::Unshelve => "unshelve",
            Action::Rescue => "rescue",
            Action::Unrescue => "unrescue",
            Action::Resize => "resize",
            Action::Migrate => "migrate",
            Action::ConfirmResize => "confirmResize",
            Action::RevertResize => "revertResize",
            Action::Evacuate => "evacuate",
        }
    }

    /// Whether the action may start from `vm` (Nova's `check_instance_state` of each call).
    fn allowed_from(self, vm: VmState) -> bool {
        use VmState::*;
        match self {
            Action::Stop => matches!(vm, Active | Error),
            Action::Start => vm == Stopped,
            Action::Reboot { hard: false } => vm == Active,
            Action::Reboot { hard: true } => {
                matches!(vm, Active | Stopped | Paused | Suspended | Error)
            }
            Action::Pause | Action::Suspend => vm == Active,
            Action::Unpause => vm == Paused,
            Action::Resume => vm == Suspended,
            Action::Rebuild => matches!(vm, Active | Stopped | Error),
            Action::Delete => true,
            // Nova's `snapshot` and `shelve`: the states whose root disk is on this host.
            Action::CreateImage | Action::CreateBackup | Action::Shelve => {
                matches!(vm, Active | Stopped | Paused | Suspended)
            }
            Action::ShelveOffload => vm == Shelved,
            Action::Unshelve => matches!(vm, Shelved | ShelvedOffloaded),
            Action::Rescue => matches!(vm, Active | Stopped | Error),
            Action::Unrescue => vm == Rescued,
            Action::Resize | Action::Migrate => matches!(vm, Active | Stopped),
            Action::ConfirmResize | Action::RevertResize => vm == Resized,
            // Nova's `evacuate`: the states a rebuild starts from.
            Action::Evacuate => matches!(vm, Active | Stopped | Error),
        }
    }

    fn task(self) -> TaskState {
        match self {
            Action::Stop => TaskState::PoweringOff,
            Action::Start => TaskState::PoweringOn,
            Action::Reboot { hard: false } => TaskState::Rebooting,
            Action::Reboot { hard: true } => TaskState::RebootingHard,
            Action::Pause => TaskState::Pausing,
            Action::Unpause => TaskState::Unpausing,
            Action::Suspend => TaskState::Suspending,
            Action::Resume => TaskState::Resuming,
            Action::Rebuild | Action::Evacuate => TaskState::Rebuilding,
            Action::Delete => TaskState::Deleting,
            Action::CreateImage => TaskState::ImageSnapshot,
            Action::CreateBackup => TaskState::ImageBackup,
            Action::Shelve => TaskState::Shelving,
            Action::ShelveOffload => TaskState::ShelvingOffloading,
            Action::Unshelve => TaskState::Unshelving,
            Action::Rescue => TaskState::Rescuing,
            Action::Unrescue => TaskState::Unrescuing,
            Action::Resize | Action::Migrate => TaskState::ResizePrep,
            Action::ConfirmResize => TaskState::ResizeConfirming,
            Action::RevertResize => TaskState::ResizeReverting,
        }
    }
}

/// Why an action is refused in the server's current state, in Nova's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Cannot '{action}' instance {id} while it is in {what} {state}")]
pub struct Conflict {
    pub action: &'static str,
    pub id: String,
    /// `vm_state` or `task_state`.
    pub what: &'static str,
    pub state: &'static str,
}

impl ServerRecord {
    /// Applies `action` to the record (as the API does before the agent sees it), or says why
    /// the state forbids it. Delete is always allowed, as in Nova, and wins over any task.
    pub fn request(&mut self, action: Action) -> Result<(), Conflict> {
        if action == Action::Delete {
            self.task_state = Some(TaskState::Deleting);
            return Ok(());
        }
        if let Some(task) = self.task_state {
            return Err(Conflict {
                action: action.name(),
                id: self.id.clone(),
                what: "task_state",
                state: task.as_str(),
            });
        }
        if !action.allowed_from(self.vm_state) {
            return Err(Conflict {
                action: action.name(),
                id: self.id.clone(),
                what: "vm_state",
                state: self.vm_state.as_str(),
            });
        }
        self.task_state = Some(action.task());
        Ok(())
    }

    /// Adds a user's request to the server's action log (`os-instance-actions`), dropping the
    /// oldest entries past [`MAX_ACTIONS`].
    pub fn record_action(&mut self, action: &str, request_id: &str, user_id: &str, now: &str) {
        self.actions.push(InstanceAction {
            action: action.to_owned(),
            request_id: request_id.to_owned(),
            user_id: user_id.to_owned(),
            project_id: self.project_id.clone(),
            start_time: now.to_owned(),
            events: Vec::new(),
        });
        if self.actions.len() > MAX_ACTIONS {
            let extra = self.actions.len() - MAX_ACTIONS;
            self.actions.drain(..extra);
        }
    }

    /// Records how the compute agent's part of the latest action went: the event Nova's
    /// compute manager records for `task`, on the newest action if it is the one that started
    /// the task and has no event yet.
    pub fn record_event(&mut self, task: TaskState, started: &str, finished: &str) {
        let failed = self.vm_state == VmState::Error;
        self.record_outcome(task, started, finished, !failed);
    }

    /// Records the compute agent's event for the action `action` started by `request_id`
    /// (one that sets no task state), if that action is still in the log without one.
    pub fn record_request_event(
        &mut self,
        action: &str,
        request_id: &str,
        event: &str,
        started: &str,
        finished: &str,
        ok: bool,
    ) {
        if let Some(a) = self
            .actions
            .iter_mut()
            .rev()
            .find(|a| a.request_id == request_id && a.action == action && a.events.is_empty())
        {
            a.events.push(ActionEvent {
                event: event.to_owned(),
                start_time: started.to_owned(),
                finish_time: Some(finished.to_owned()),
                result: Some(if ok { "Success" } else { "Error" }.to_owned()),
            });
        }
    }

    /// [`Self::record_event`] with the result given: a snapshot that failed leaves the server
    /// as it was, not in ERROR, and its event still says `Error`.
    pub fn record_outcome(&mut self, task: TaskState, started: &str, finished: &str, ok: bool) {
        let failed = !ok;
        let Some(action) = self.actions.last_mut() else {
            return;
        };
        // A resize records one event per step (prep, resize, finish); a migrate is a resize
        // to the same flavor.
        let started_it = action.action == task.action_name()
            || (task.is_resizing() && action.action == "migrate")
            || (task == TaskState::Rebuilding && action.action == "evacuate");
        let name = task.event_name();
        if !started_it || action.events.iter().any(|e| e.event == name) {
            return;
        }
        action.events.push(ActionEvent {
            event: name.to_owned(),
            start_time: started.to_owned(),
            finish_time: Some(finished.to_owned()),
            result: Some(if failed { "Error" } else { "Success" }.to_owned()),
        });
    }
}

impl TaskState {
    /// The action (as the action log names it) that starts this task.
    pub fn action_name(self) -> &'static str {
        match self {
            TaskState::Scheduling | TaskState::Spawning => "create",
            TaskState::PoweringOff => "stop",
            TaskState::PoweringOn => "start",
            TaskState::Rebooting | TaskState::RebootingHard => "reboot",
            TaskState::Pausing => "pause",
            TaskState::Unpausing => "unpause",
            TaskState::Suspending => "suspend",
            TaskState::Resuming => "resume",
            TaskState::Rebuilding => "rebuild",
            TaskState::Deleting => "delete",
            TaskState::ImageSnapshot
            | TaskState::ImagePendingUpload
            | TaskState::ImageUploading => "createImage",
            TaskState::ImageBackup => "createBackup",
            TaskState::Shelving
            | TaskState::ShelvingImagePendingUpload
            | TaskState::ShelvingImageUploading => "shelve",
            TaskState::ShelvingOffloading => "shelveOffload",
            TaskState::Unshelving => "unshelve",
            TaskState::Rescuing => "rescue",
            TaskState::Unrescuing => "unrescue",
            // A migrate records its own name; the API passes it (see `record_outcome`).
            TaskState::ResizePrep
            | TaskState::ResizeMigrating
            | TaskState::ResizeMigrated
            | TaskState::ResizeFinish => "resize",
            TaskState::ResizeReverting => "revertResize",
            TaskState::ResizeConfirming => "confirmResize",
        }
    }

    /// The event Nova's compute manager records for the work of this task.
    pub fn event_name(self) -> &'static str {
        match self {
            TaskState::Scheduling | TaskState::Spawning => "compute__do_build_and_run_instance",
            TaskState::PoweringOff => "compute_stop_instance",
            TaskState::PoweringOn => "compute_start_instance",
            TaskState::Rebooting | TaskState::RebootingHard => "compute_reboot_instance",
            TaskState::Pausing => "compute_pause_instance",
            TaskState::Unpausing => "compute_unpause_instance",
            TaskState::Suspending => "compute_suspend_instance",
            TaskState::Resuming => "compute_resume_instance",
            TaskState::Rebuilding => "compute_rebuild_instance",
            TaskState::Deleting => "compute_terminate_instance",
            TaskState::ImageSnapshot
            | TaskState::ImagePendingUpload
            | TaskState::ImageUploading => "compute_snapshot_instance",
            TaskState::ImageBackup => "compute_backup_instance",
            TaskState::Shelving
            | TaskState::ShelvingImagePendingUpload
            | TaskState::ShelvingImageUploading => "compute_shelve_instance",
            TaskState::ShelvingOffloading => "compute_shelve_offload_instance",
            TaskState::Unshelving => "compute_unshelve_instance",
            TaskState::Rescuing => "compute_rescue_instance",
            TaskState::Unrescuing => "compute_unrescue_instance",
            TaskState::ResizePrep => "compute_prep_resize",
            TaskState::ResizeMigrating | TaskState::ResizeMigrated => "compute_resize_instance",
            TaskState::ResizeFinish => "compute_finish_resize",
            TaskState::ResizeReverting => "compute_revert_resize",
            TaskState::ResizeConfirming => "compute_confirm_resize",
        }
    }
}

/// How many actions a server's log keeps (the newest).
pub const MAX_ACTIONS: usize = 100;

/// One user request on a server, as Nova's `os-instance-actions` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceAction {
    /// `create`, `stop`, `start`, `reboot`, `pause`, ... (Nova's `instance_actions` names).
    pub action: String,
    /// The `x-openstack-request-id` the API answered the request with.
    pub request_id: String,
    pub user_id: String,
    pub project_id: String,
    /// RFC 3339, UTC.
    pub start_time: String,
    /// What the compute agent did for it.
    #[serde(default)]
    pub events: Vec<ActionEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionEvent {
    pub event: String,
    pub start_time: String,
    #[serde(default)]
    pub finish_time: Option<String>,
    /// `Success` or `Error`.
    #[serde(default)]
    pub result: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use shoal_state::time::now_rfc3339;

    use super::*;

    pub(crate) fn record() -> ServerRecord {
        ServerRecord {
            id: "6f1c2d7e-0000-4000-8000-000000000001".into(),
            name: "vm".into(),
            project_id: "p".into(),
            user_id: "u".into(),
            flavor: FlavorSnapshot {
                id: "1".into(),
                name: "m1.tiny".into(),
                vcpus: 1,
                ram_mb: 512,
                disk_gb: 1,
                ephemeral_gb: 0,
                swap_mb: 0,
                extra_specs: BTreeMap::new(),
            },
            image: ImageSnapshot {
                id: "img".into(),
                disk_format: "raw".into(),
                kernel_id: None,
                ramdisk_id: None,
                kernel_cmdline: None,
            },
            key_name: None,
            key_data: None,
            user_data: None,
            metadata: BTreeMap::new(),
            security_groups: vec!["default".into()],
            ports: Vec::new(),
            availability_zone: "nova".into(),
            host: Some("n1".into()),
            vm_state: VmState::Active,
            task_state: None,
            power_state: power::RUNNING,
            fault: None,
            launch_index: 0,
            reservation_id: "r-1".into(),
            instance_name: Some(instance_name(42)),
            created: now_rfc3339(),
            updated: now_rfc3339(),
            launched_at: None,
            access_ipv4: String::new(),
            access_ipv6: String::new(),
            locked: false,
            description: None,
            crash_dump: None,
            config_drive: false,
            actions: Vec::new(),
            snapshot_image: None,
            shelved: None,
            backup: None,
            rescue: None,
            migration: None,
            past_migrations: Vec::new(),
            tags: BTreeSet::new(),
        }
    }

    /// Tags follow Nova's rules: 1 to 60 characters without ',' or '/', at most 50 per
    /// server, changed only in active, paused, suspended or stopped servers.
    #[test]
    fn tags_as_nova_bounds_them() {
        let mut r = record();
        r.vm_state = VmState::Active;
        assert!(r.add_tag("web").unwrap());
        assert!(!r.add_tag("web").unwrap());
        for bad in ["", "a,b", "a/b", &"x".repeat(61)] {
            assert!(
                matches!(r.add_tag(bad), Err(ComputeError::BadRequest(_))),
                "{bad:?}"
            );
        }
        let fifty: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
        r.set_tags(&fifty).unwrap();
        assert!(
            matches!(r.add_tag("one-more"), Err(ComputeError::BadRequest(m)) if m.contains("limit 50"))
        );
        let mut many = fifty.clone();
        many.push("t50".into());
        assert!(r.set_tags(&many).is_err());
        r.set_tags(&["b".into(), "a".into(), "b".into()]).unwrap();
        assert_eq!(r.tags.iter().collect::<Vec<_>>(), ["a", "b"]);
        r.remove_tag("a").unwrap();
        assert!(matches!(r.remove_tag("a"), Err(ComputeError::NotFound(_))));
        r.vm_state = VmState::Building;
        assert!(
            matches!(r.clear_tags(), Err(ComputeError::Conflict(m)) if m.contains("vm_state building"))
        );
        r.vm_state = VmState::Stopped;
        r.clear_tags().unwrap();
        assert!(r.tags.is_empty());
    }

    /// The four list filters, as Nova's `tags`, `tags-any`, `not-tags`, `not-tags-any`.
    #[test]
    fn tag_filters() {
        let tags: BTreeSet<String> = ["a", "b"].iter().map(|t| t.to_string()).collect();
        let v = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let f = |all: &[&str], any: &[&str], not_all: &[&str], not_any: &[&str]| TagFilter {
            all: v(all),
            any: v(any),
            not_all: v(not_all),
            not_any: v(not_any),
        };
        assert!(f(&[], &[], &[], &[]).matches(&tags));
        assert!(f(&["a", "b"], &[], &[], &[]).matches(&tags));
        assert!(!f(&["a", "c"], &[], &[], &[]).matches(&tags));
        assert!(f(&[], &["c", "b"], &[], &[]).matches(&tags));
        assert!(!f(&[], &["c"], &[], &[]).matches(&tags));
        assert!(f(&[], &[], &["a", "c"], &[]).matches(&tags));
        assert!(!f(&[], &[], &["a", "b"], &[]).matches(&tags));
        assert!(!f(&[], &[], &[], &["c", "a"]).matches(&tags));
        assert!(f(&[], &[], &[], &["c"]).matches(&tags));
    }

    #[test]
    fn status_follows_nova() {
        let mut r = record();
        assert_eq!(r.status(), "ACTIVE");
        r.request(Action::Reboot { hard: true }).unwrap();
        assert_eq!(r.status(), "HARD_REBOOT");
        r.task_state = None;
        r.vm_state = VmState::Stopped;
        assert_eq!(r.status(), "SHUTOFF");
        r.vm_state = VmState::Building;
        assert_eq!(r.status(), "BUILD");
    }

    #[test]
    fn actions_the_state_forbids_are_conflicts() {
        let mut r = record();
        let e = r.request(Action::Start).unwrap_err();
        assert_eq!(e.state, "active");
        r.request(Action::Stop).unwrap();
        assert_eq!(r.task_state, Some(TaskState::PoweringOff));
        // A task in progress refuses another action but never a delete.
        assert_eq!(r.request(Action::Stop).unwrap_err().what, "task_state");
        r.request(Action::Delete).unwrap();
        assert_eq!(r.task_state, Some(TaskState::Deleting));
    }

    #[test]
    fn a_deleted_server_keeps_its_actions_and_nothing_pending() {
        let mut r = record();
        r.record_action("create", "req-1", "u", "2026-01-01T00:00:00Z");
        r.task_state = Some(TaskState::Deleting);
        r.crash_dump = Some("req-2".into());
        r.description = Some("web".into());
        let tomb = crate::usage::DeletedServer::of(&r, "2026-01-02T00:00:00Z");
        assert_eq!(tomb.actions, r.actions);
        let gone = tomb.as_record();
        assert_eq!(gone.vm_state, VmState::Deleted);
        assert_eq!(gone.task_state, None);
        assert_eq!(gone.crash_dump, None);
        assert_eq!(gone.description.as_deref(), Some("web"));
        assert_eq!(gone.updated, "2026-01-02T00:00:00Z");
    }

    #[test]
    fn pause_suspend_and_rebuild_follow_novas_state_rules() {
        let mut r = record();
        r.request(Action::Pause).unwrap();
        r.task_state = None;
        r.vm_state = VmState::Paused;
        assert_eq!(r.status(), "PAUSED");
        // Paused: no suspend, no soft reboot, no rebuild; unpause and a hard reboot are fine.
        for refused in [
            Action::Suspend,
            Action::Reboot { hard: false },
            Action::Rebuild,
            Action::Stop,
        ] {
            assert_eq!(r.clone().request(refused).unwrap_err().state, "paused");
        }
        r.clone().request(Action::Reboot { hard: true }).unwrap();
        r.request(Action::Unpause).unwrap();
        assert_eq!(r.task_state, Some(TaskState::Unpausing));
        r.task_state = None;
        r.vm_state = VmState::Suspended;
        assert_eq!(r.status(), "SUSPENDED");
        assert!(r.clone().request(Action::Unpause).is_err());
        r.request(Action::Resume).unwrap();
        // A rebuild shows REBUILD from a stopped server too.
        r.task_state = None;
        r.vm_state = VmState::Stopped;
        r.request(Action::Rebuild).unwrap();
        assert_eq!(r.status(), "REBUILD");
    }

    #[test]
    fn the_action_log_keeps_the_newest_and_events_land_on_the_pending_action() {
        let mut r = record();
        for i in 0..MAX_ACTIONS + 5 {
            r.record_action("reboot", &format!("req-{i}"), "u", "t");
        }
        assert_eq!(r.actions.len(), MAX_ACTIONS);
        assert_eq!(r.actions[0].request_id, "req-5");
        r.record_action("stop", "req-stop", "u", "t0");
        r.record_event(TaskState::PoweringOff, "t1", "t2");
        let last = r.actions.last().unwrap();
        assert_eq!(last.events[0].event, "compute_stop_instance");
        assert_eq!(last.events[0].result.as_deref(), Some("Success"));
        // Never twice, and never on an action that did not start the task.
        r.record_event(TaskState::PoweringOff, "t3", "t4");
        assert_eq!(r.actions.last().unwrap().events.len(), 1);
        r.record_action("lock", "req-lock", "u", "t5");
        r.record_event(TaskState::Rebooting, "t6", "t7");
        assert!(r.actions.last().unwrap().events.is_empty());
        r.record_action("reboot", "req-reboot", "u", "t8");
        r.vm_state = VmState::Error;
        r.record_event(TaskState::RebootingHard, "t9", "t10");
        let reboot = r.actions.last().unwrap();
        assert_eq!(reboot.events[0].result.as_deref(), Some("Error"));
    }

    #[test]
    fn snapshot_and_shelve_follow_novas_state_rules() {
        use VmState::*;
        for vm in [Active, Stopped, Paused, Suspended] {
            let mut r = record();
            r.vm_state = vm;
            let status = r.status();
            r.clone().request(Action::Shelve).unwrap();
            r.request(Action::CreateImage).unwrap();
            assert_eq!(r.task_state, Some(TaskState::ImageSnapshot));
            // The status stays what it was while the snapshot runs, as in Nova.
            assert_eq!(r.status(), status);
            assert_eq!(r.task_state.unwrap().as_str(), "image_snapshot");
            // One task at a time: a second snapshot is a 409 on the task state.
            let e = r.request(Action::CreateImage).unwrap_err();
            assert_eq!((e.what, e.state), ("task_state", "image_snapshot"));
        }
        for vm in [Error, Building, Shelved, ShelvedOffloaded] {
            let mut r = record();
            r.vm_state = vm;
            let e = r.clone().request(Action::CreateImage).unwrap_err();
            assert_eq!((e.action, e.what), ("createImage", "vm_state"));
            assert!(r.request(Action::Shelve).is_err());
        }
        let mut r = record();
        r.vm_state = Shelved;
        assert_eq!(r.status(), "SHELVED");
        for refused in [Action::Start, Action::Stop, Action::Rebuild, Action::Pause] {
            assert_eq!(r.clone().request(refused).unwrap_err().state, "shelved");
        }
        r.clone().request(Action::ShelveOffload).unwrap();
        r.request(Action::Unshelve).unwrap();
        assert_eq!(r.task_state, Some(TaskState::Unshelving));
        let mut r = record();
        r.vm_state = ShelvedOffloaded;
        assert_eq!(r.status(), "SHELVED_OFFLOADED");
        assert_eq!(r.vm_state.as_str(), "shelved_offloaded");
        assert!(r.clone().request(Action::ShelveOffload).is_err());
        r.request(Action::Unshelve).unwrap();
        // Nova's spellings, in the row and in the API.
        let json = serde_json::to_string(&ShelvedOffloaded).unwrap();
        assert_eq!(json, "\"shelved_offloaded\"");
        assert_eq!(
            TaskState::ShelvingImagePendingUpload.as_str(),
            "shelving_image_pending_upload"
        );
        assert_eq!(
            TaskState::ShelvingImageUploading.event_name(),
            "compute_shelve_instance"
        );
        assert_eq!(TaskState::ImageUploading.action_name(), "createImage");
    }

    #[test]
    fn a_failed_snapshot_records_an_error_event_without_an_error_state() {
        let mut r = record();
        r.record_action("createImage", "req-1", "u", "t0");
        r.record_outcome(TaskState::ImageSnapshot, "t1", "t2", false);
        let ev = &r.actions.last().unwrap().events[0];
        assert_eq!(ev.event, "compute_snapshot_instance");
        assert_eq!(ev.result.as_deref(), Some("Error"));
        assert_eq!(r.vm_state, VmState::Active);
    }

    #[test]
    fn rescue_follows_novas_state_rules() {
        use VmState::*;
        for vm in [Active, Stopped, Error] {
            let mut r = record();
            r.vm_state = vm;
            r.request(Action::Rescue).unwrap();
            assert_eq!(r.task_state.unwrap().as_str(), "rescuing");
        }
        for vm in [Paused, Suspended, Shelved, Rescued, Resized] {
            let mut r = record();
            r.vm_state = vm;
            assert_eq!(r.request(Action::Rescue).unwrap_err().what, "vm_state");
        }
        let mut r = record();
        r.vm_state = Rescued;
        assert_eq!(r.status(), "RESCUE");
        // Rescued: no reboot, stop, resize or snapshot; unrescue and delete are fine.
        for refused in [
            Action::Reboot { hard: false },
            Action::Reboot { hard: true },
            Action::Stop,
            Action::Resize,
            Action::CreateImage,
        ] {
            assert_eq!(r.clone().request(refused).unwrap_err().state, "rescued");
        }
        r.clone().request(Action::Delete).unwrap();
        r.request(Action::Unrescue).unwrap();
        assert_eq!(r.task_state, Some(TaskState::Unrescuing));
        assert_eq!(r.status(), "RESCUE");
        assert_eq!(serde_json::to_string(&Rescued).unwrap(), "\"rescued\"");
    }

    #[test]
    fn resize_walks_novas_states_and_records_each_step() {
        use VmState::*;
        for vm in [Active, Stopped] {
            let mut r = record();
            r.vm_state = vm;
            r.record_action("resize", "req-1", "u", "t0");
            r.request(Action::Resize).unwrap();
            for (task, event) in [
                (TaskState::ResizePrep, "compute_prep_resize"),
                (TaskState::ResizeMigrating, "compute_resize_instance"),
                (TaskState::ResizeMigrated, "compute_resize_instance"),
                (TaskState::ResizeFinish, "compute_finish_resize"),
            ] {
                r.task_state = Some(task);
                assert_eq!(r.status(), "RESIZE", "{task:?}");
                assert_eq!(task.event_name(), event);
                r.record_outcome(task, "t1", "t2", true);
                // Another task is refused while one runs.
                assert_eq!(
                    r.clone().request(Action::Stop).unwrap_err().what,
                    "task_state"
                );
            }
            let events: Vec<&str> = r.actions[0]
                .events
                .iter()
                .map(|e| e.event.as_str())
                .collect();
            assert_eq!(
                events,
                [
                    "compute_prep_resize",
                    "compute_resize_instance",
                    "compute_finish_resize"
                ]
            );
            r.task_state = None;
            r.vm_state = Resized;
            assert_eq!(r.status(), "VERIFY_RESIZE");
            for refused in [
                Action::Resize,
                Action::Migrate,
                Action::Stop,
                Action::Rescue,
            ] {
                assert_eq!(r.clone().request(refused).unwrap_err().state, "resized");
            }
            let mut revert = r.clone();
            revert.request(Action::RevertResize).unwrap();
            assert_eq!(revert.status(), "REVERT_RESIZE");
            assert_eq!(revert.task_state.unwrap().as_str(), "resize_reverting");
            r.request(Action::ConfirmResize).unwrap();
            assert_eq!(r.status(), "VERIFY_RESIZE");
            assert_eq!(r.task_state.unwrap().as_str(), "resize_confirming");
        }
        // Confirm and revert only from resized; resize and migrate only from active or stopped.
        for vm in [Active, Stopped, Paused, Error] {
            let mut r = record();
            r.vm_state = vm;
            assert!(r.clone().request(Action::ConfirmResize).is_err());
            assert!(r.clone().request(Action::RevertResize).is_err());
            let ok = matches!(vm, Active | Stopped);
            assert_eq!(r.clone().request(Action::Migrate).is_ok(), ok, "{vm:?}");
            assert_eq!(r.request(Action::Resize).is_ok(), ok, "{vm:?}");
        }
        // A migrate's steps land on the `migrate` action.
        let mut r = record();
        r.record_action("migrate", "req-m", "u", "t0");
        r.record_outcome(TaskState::ResizePrep, "t1", "t2", true);
        assert_eq!(r.actions[0].events[0].event, "compute_prep_resize");
        assert_eq!(
            serde_json::to_string(&TaskState::ResizeMigrated).unwrap(),
            "\"resize_migrated\""
        );
        assert_eq!(Migration::claim_key("x"), "x.migration");
    }

    #[test]
    fn instance_names() {
        assert_eq!(instance_name(1), "instance-00000001");
        assert_eq!(instance_name(0x1234abcd), "instance-1234abcd");
    }
}
