//! The libvirt driver. Every libvirt call blocks, so each runs on tokio's blocking pool over
//! one connection the driver keeps for the node's lifetime (`test:///default` keeps its
//! domains per connection: a new connection would see none of them).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

/// A domain's state as the agent acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    Running,
    Paused,
    Shutoff,
    Crashed,
    /// Being shut down, blocked, or a state libvirt added later.
    Other,
}

impl DomainState {
    /// Nova's power state integer for this domain state.
    pub fn power_state(self) -> u8 {
        use crate::server::power;
        match self {
            DomainState::Running => power::RUNNING,
            DomainState::Paused => power::PAUSED,
            DomainState::Shutoff => power::SHUTDOWN,
            DomainState::Crashed => power::CRASHED,
            DomainState::Other => power::NOSTATE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("libvirt {op} failed: {message}")]
    Call { op: &'static str, message: String },
    #[error("the libvirt call was cancelled")]
    Cancelled,
}

/// Owns the connection and closes it when the driver goes away.
struct Conn(Connect);

impl Drop for Conn {
    fn drop(&mut self) {
        if let Err(e) = self.0.close() {
            tracing::debug!(error = %e, "closing the libvirt connection");
        }
    }
}

#[derive(Clone)]
pub struct Libvirt {
    uri: Arc<str>,
    conn: Arc<Mutex<Conn>>,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt").field("uri", &self.uri).finish()
    }
}

fn call_err(op: &'static str) -> impl FnOnce(virt::error::Error) -> HypervisorError {
    move |e| HypervisorError::Call {
        op,
        message: e.message().to_owned(),
    }
}

/// How often a start that lost its tap is tried again (`start_domain`).
const TAP_RACE_ATTEMPTS: u32 = 4;

/// Whether a failed start is libvirt finding the tap it had just created gone: "Cannot set
/// interface MTU on 'tapXXX': No such device" and the like. With the datapath in a namespace
/// of its own (`shoal dev --netns`, several nodes on one machine) the network agent moves each
/// VM tap out of libvirtd's namespace as soon as it sees it, and a move that lands between
/// libvirt's creating the tap and its setting the tap's MAC, state or MTU fails the start.
/// libvirt then closes the tap (so it vanishes) and leaves the domain as it was, managed-save
/// image included: the start can simply be made again.
fn lost_its_tap(code: ErrorNumber, message: &str) -> bool {
    code == ErrorNumber::SystemError
        && message.contains("'tap")
        && message.contains("No such device")
}

/// Starts (or restores from its managed-save image) a domain that is not running, again when
/// the network agent took its tap from under libvirt (`lost_its_tap`): the window is the few
/// calls libvirt makes on a new tap, so a second attempt meets it only by bad luck.
fn start_domain(dom: &Domain) -> Result<(), HypervisorError> {
    let mut attempt = 1;
    loop {
        match dom.create() {
            Ok(_) => return Ok(()),
            Err(e) if attempt < TAP_RACE_ATTEMPTS && lost_its_tap(e.code(), e.message()) => {
                tracing::info!(attempt, error = %e.message(), "the domain's tap was moved while libvirt set it up; starting again");
                std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
                attempt += 1;
                if dom.is_active().map_err(call_err("is_active"))? {
                    return Ok(());
                }
            }
            Err(e) => return Err(call_err("start")(e)),
        }
    }
}

impl Libvirt {
    /// Opens `uri` (for example `qemu:///system` or `test:///default`).
    pub async fn connect(uri: &str) -> Result<Libvirt, HypervisorError> {
        let uri_owned = uri.to_owned();
        let conn = tokio::task::spawn_blocking(move || {
            // libvirt prints every error to stderr by default; the agent logs them itself.
            virt::error::clear_error_callback();
            Connect::open(Some(&uri_owned)).map_err(|e| HypervisorError::Connect {
                uri: uri_owned.clone(),
                message: e.message().to_owned(),
            })
        })
        .await
        .map_err(|_| HypervisorError::Cancelled)??;
        Ok(Libvirt {
            uri: uri.into(),
            conn: Arc::new(Mutex::new(Conn(conn))),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connect) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&guard.0)
        })
        .await
        .map_err(|_| HypervisorError::Cancelled)?
    }

    /// The hypervisor's type (`QEMU`, `TEST`) and version as libvirt encodes it
    /// (major * 1,000,000 + minor * 1,000 + release), for the hosts row.
    pub async fn hypervisor(&self) -> Result<(String, u64), HypervisorError> {
        self.with(|c| {
            let t = c.get_type().map_err(call_err("get_type"))?;
            let v = c.get_hyp_version().map_err(call_err("get_hyp_version"))?;
            Ok((t, u64::from(v)))
        })
        .await
    }

    /// Defines the domain (replacing an earlier definition of the same uuid) and starts it
    /// unless it already runs. Without libvirt's schema validation (as Nova defines): it
    /// parses the whole RelaxNG schema on every call, 10-20 ms of CPU per define here, most of
    /// a node's CPU when servers are created in bulk (docs/benchmarks.md). The XML is ours
    /// (`DomainSpec::to_xml`), and its variants are checked against the schema by the domain
    /// tests; libvirt still refuses XML it cannot parse or a definition it cannot run.
    pub async fn define_and_start(&self, xml: String) -> Result<(), HypervisorError> {
        self.with(move |c| {
            let dom = Domain::define_xml(c, &xml).map_err(call_err("define"))?;
            if !dom.is_active().map_err(call_err("is_active"))? {
                start_domain(&dom)?;
            }
            Ok(())
        })
        .await
    }

    /// The domain with `uuid`, if libvirt knows it.
    pub async fn state(&self, uuid: &str) -> Result<Option<DomainState>, HypervisorError> {
        let uuid = uuid.to_owned();
        self.with(move |c| match lookup(c, &uuid)? {
            Some(dom) => Ok(Some(domain_state(&dom)?)),
            None => Ok(None),
        })
        .await
    }

    /// The name of the domain with `uuid`, if libvirt knows it: one lookup, where listing
    /// every domain of the host would cost a call per domain.
    pub async fn name_of(&self, uuid: &str) -> Result<Option<String>, HypervisorError> {
        let uuid = uuid.to_owned();
        self.with(move |c| match lookup(c, &uuid)? {
            Some(dom) => Ok(Some(dom.get_name().map_err(call_err("get_name"))?)),
            None => Ok(None),
        })
        .await
    }

    /// Starts a defined domain that is not running.
    pub async fn start(&self, uuid: &str) -> Result<(), HypervisorError> {
        let uuid = uuid.to_owned();
        self.with(move |c| {
            let dom = lookup(c, &uuid)?.ok_or_else(|| HypervisorError::Call {
                op: "start",
                message: format!("no domain with uuid {uuid}"),
            })?;
            if !dom.is_active().map_err(call_err("is_active"))? {
                start_domain(&dom)?;
            }
            Ok(())
        })
        .await
    }

    /// Pauses the running domain's vCPUs (Nova's pause): memory stays in the host's RAM.
    pub async fn pause(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.on_domain(uuid, "pause", |dom| {
            if domain_state(dom)? != DomainState::Paused {
                dom.suspend().map_err(call_err("pause"))?;
            }
            Ok(())
        })
        .await
    }

    /// Injects a non-maskable interrupt into the running domain (Nova's `trigger_crash_dump`:
    /// what the guest does with it is its own configuration).
    pub async fn inject_nmi(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.on_domain(uuid, "inject-nmi", |dom| {
            // SAFETY: `dom` owns a live virDomainPtr for the whole call; flags must be 0.
            let rc = unsafe { virt::sys::virDomainInjectNMI(dom.as_ptr(), 0) };
            if rc < 0 {
                return Err(call_err("inject-nmi")(virt::error::Error::last_error()));
            }
            Ok(())
        })
        .await
    }

    /// Lets a paused domain run again.
    pub async fn unpause(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.on_domain(uuid, "unpause", |dom| {
            if domain_state(dom)? == DomainState::Paused {
                dom.resume().map_err(call_err("unpause"))?;
            }
            Ok(())
        })
        .await
    }

    /// Saves the domain's memory to libvirt's managed-save file and stops it (Nova's suspend on
    /// libvirt); [`Self::start`] restores it.
    pub async fn suspend(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.on_domain(uuid, "suspend", |dom| {
            if dom.is_active().map_err(call_err("is_active"))? {
                dom.managed_save(0).map_err(call_err("suspend"))?;
            }
            Ok(())
        })
        .await
    }

    /// Drops a managed-save image, so that the next start boots afresh (a hard reboot or a
    /// rebuild of a suspended server). No image, or no domain, is done.
    pub async fn discard_saved(&self, uuid: &str) -> Result<(), HypervisorError> {
        let uuid = uuid.to_owned();
        self.with(move |c| {
            let Some(dom) = lookup(c, &uuid)? else {
                return Ok(());
            };
            if dom
                .has_managed_save(0)
                .map_err(call_err("has_managed_save"))?
            {
                dom.managed_save_remove(0)
                    .map_err(call_err("managed_save_remove"))?;
            }
            Ok(())
        })
        .await
    }

    /// Runs `f` on the domain with `uuid`; no such domain is an error of `op`.
    async fn on_domain(
        &self,
        uuid: &str,
        op: &'static str,
        f: impl FnOnce(&Domain) -> Result<(), HypervisorError> + Send + 'static,
    ) -> Result<(), HypervisorError> {
        let uuid = uuid.to_owned();
        self.with(move |c| {
            let dom = lookup(c, &uuid)?.ok_or_else(|| HypervisorError::Call {
                op,
                message: format!("no domain with uuid {uuid}"),
            })?;
            f(&dom)
        })
        .await
    }

    /// Asks the guest to shut down (ACPI) and waits up to `grace` for it; then powers it off.
    /// A guest without ACPI handling (a busybox init) is powered off after the grace period,
    /// as Nova's clean shutdown falls back to destroy.
    pub async fn stop(&self, uuid: &str, grace: Duration) -> Result<(), HypervisorError> {
        let uuid = uuid.to_owned();
        self.with(move |c| {
            let Some(dom) = lookup(c, &uuid)? else {
                return Ok(());
            };
            if !dom.is_active().map_err(call_err("is_active"))? {
                return Ok(());
            }
            if !grace.is_zero() && dom.shutdown().is_ok() {
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    if !dom.is_active().map_err(call_err("is_active"))? {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            match dom.destroy() {
                Ok(()) => Ok(()),
                // It stopped between the check and the call.
                Err(_) if !dom.is_active().map_err(call_err("is_active"))? => Ok(()),
                Err(e) => Err(call_err("destroy")(e)),
            }
        })
        .await
    }

    /// Powers the domain off (if it runs) and removes its definition. Absent is done.
    pub async fn destroy(&self, uuid: &str) -> Result<(), HypervisorError> {
        let uuid = uuid.to_owned();
        self.with(move |c| {
            let Some(dom) = lookup(c, &uuid)? else {
                return Ok(());
            };
            if dom.is_active().map_err(call_err("is_active"))? {
                if let Err(e) = dom.destroy() {
                    if dom.is_active().map_err(call_err("is_active"))? {
                        return Err(call_err("destroy")(e));
                    }
                }
            }
            // A transient domain is gone once destroyed. A suspended one's saved memory goes
            // with its definition.
            match dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE) {
                Ok(()) => Ok(()),
                Err(e)
                    if matches!(
                        e.code(),
                        ErrorNumber::NoDomain | ErrorNumber::OperationInvalid
                    ) =>
                {
                    Ok(())
                }
                Err(e) => Err(call_err("undefine")(e)),
            }
        })
        .await
    }

    /// Every domain libvirt knows on this connection.
    pub async fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        self.with(|c| {
            let doms = c.list_all_domains(0).map_err(call_err("list"))?;
            let mut out = Vec::with_capacity(doms.len());
            for d in &doms {
                // A domain undefined between the listing and these calls (another node's
                // agent on a shared libvirtd, a delete in flight) is simply no longer there.
                let info = (|| {
                    Ok::<_, HypervisorError>(DomainInfo {
                        name: d.get_name().map_err(call_err("get_name"))?,
                        uuid: d.get_uuid_string().map_err(call_err("get_uuid"))?,
                        state: domain_state(d)?,
                    })
                })();
                match info {
                    Ok(i) => out.push(i),
                    Err(e) if e.to_string().contains("Domain not found") => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
        .await
    }
}

fn lookup(c: &Connect, uuid: &str) -> Result<Option<Domain>, HypervisorError> {
    match Domain::lookup_by_uuid_string(c, uuid) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
        Err(e) => Err(call_err("lookup")(e)),
    }
}

fn domain_state(d: &Domain) -> Result<DomainState, HypervisorError> {
    let (state, _reason) = d.get_state().map_err(call_err("get_state"))?;
    Ok(match state {
        virt::sys::VIR_DOMAIN_RUNNING => DomainState::Running,
        virt::sys::VIR_DOMAIN_PAUSED => DomainState::Paused,
        virt::sys::VIR_DOMAIN_SHUTOFF => DomainState::Shutoff,
        virt::sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
        _ => DomainState::Other,
    })
}

/// `kvm` when /dev/kvm can be opened for reading and writing, else `qemu` (TCG). Some hosts
/// expose a /dev/kvm that opens but cannot run a guest (nested without the CPU features);
/// there the operator sets `[compute] virt_type = "qemu"` (`--virt-type qemu`).
pub fn detect_virt_type() -> &'static str {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => "kvm",
        Err(_) => "qemu",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tests::spec;

    /// libvirt's test driver is real libvirt with an in-memory hypervisor: the calls, the XML
    /// validation and the state machine are libvirt's own.
    #[tokio::test]
    async fn a_domain_lives_and_dies_through_the_test_driver() {
        let lv = Libvirt::connect("test:///default").await.unwrap();
        let mut s = spec();
        s.virt_type = "kvm".into();
        lv.define_and_start(s.to_xml()).await.unwrap();
        assert_eq!(lv.state(&s.uuid).await.unwrap(), Some(DomainState::Running));
        assert!(lv.list().await.unwrap().iter().any(|d| d.name == s.name));
        lv.stop(&s.uuid, Duration::ZERO).await.unwrap();
        assert_eq!(lv.state(&s.uuid).await.unwrap(), Some(DomainState::Shutoff));
        lv.start(&s.uuid).await.unwrap();
        assert_eq!(lv.state(&s.uuid).await.unwrap(), Some(DomainState::Running));
        lv.destroy(&s.uuid).await.unwrap();
        assert_eq!(lv.state(&s.uuid).await.unwrap(), None);
        // Destroying what is gone is done, not an error.
        lv.destroy(&s.uuid).await.unwrap();
    }

    /// An NMI reaches a running domain; a domain that is not there is an error.
    #[tokio::test]
    async fn inject_nmi_through_the_test_driver() {
        let lv = Libvirt::connect("test:///default").await.unwrap();
        let mut s = spec();
        s.virt_type = "kvm".into();
        s.uuid = "3f0c9a52-0000-4000-8000-00000000a4a1".into();
        s.name = "instance-0000a4a1".into();
        assert!(lv.inject_nmi(&s.uuid).await.is_err());
        lv.define_and_start(s.to_xml()).await.unwrap();
        lv.inject_nmi(&s.uuid).await.unwrap();
        lv.destroy(&s.uuid).await.unwrap();
    }

    #[tokio::test]
    async fn pause_and_suspend_through_the_test_driver() {
        let lv = Libvirt::connect("test:///default").await.unwrap();
        let mut s = spec();
        s.virt_type = "kvm".into();
        s.uuid = "3f0c9a52-0000-4000-8000-00000000beef".into();
        s.name = "instance-0000beef".into();
        lv.define_and_start(s.to_xml()).await.unwrap();
        lv.pause(&s.uuid).await.unwrap();
        assert_eq!(lv.state(&s.uuid).await.unwrap(), Some(DomainState::Paused));
        lv.unpause(&s.uuid).await.unwrap();
        assert_eq!(lv.state(&s.uuid).await.unwrap(), Some(DomainState::Running));
        // Suspend saves the memory and stops the domain; a start restores it.
        lv.suspend(&s.uuid).await.unwrap();
        assert_eq!(lv.state(&s.uuid).await.unwrap(), Some(DomainState::Shutoff));
        lv.start(&s.uuid).await.unwrap();
        assert_eq!(lv.state(&s.uuid).await.unwrap(), Some(DomainState::Running));
        // A suspended domain is destroyed with its saved memory.
        lv.suspend(&s.uuid).await.unwrap();
        lv.destroy(&s.uuid).await.unwrap();
        assert_eq!(lv.state(&s.uuid).await.unwrap(), None);
        // Pausing what is not there says so.
        let err = lv.pause(&s.uuid).await.unwrap_err();
        assert!(
            matches!(err, HypervisorError::Call { op: "pause", .. }),
            "{err}"
        );
    }

    /// Only a tap that vanished under libvirt makes a start worth trying again; any other
    /// failure (a missing disk, a tap libvirt could not create) is the answer.
    #[test]
    fn only_a_lost_tap_is_started_again() {
        for (code, message, again) in [
            (
                ErrorNumber::SystemError,
                "Cannot set interface MTU on 'tape8184c2e-cb': No such device",
                true,
            ),
            (
                ErrorNumber::SystemError,
                "Cannot set interface MAC on 'tape8184c2e-cb': No such device",
                true,
            ),
            (
                ErrorNumber::SystemError,
                "Unable to create tap device tape8184c2e-cb: Device or resource busy",
                false,
            ),
            (
                ErrorNumber::SystemError,
                "Cannot access storage file '/x/disk': No such file or directory",
                false,
            ),
            (
                ErrorNumber::InternalError,
                "process exited while connecting to monitor: 'tap0': No such device",
                false,
            ),
        ] {
            assert_eq!(lost_its_tap(code, message), again, "{message}");
        }
    }

    #[tokio::test]
    async fn invalid_xml_is_refused_with_libvirts_reason() {
        let lv = Libvirt::connect("test:///default").await.unwrap();
        let err = lv
            .define_and_start("<domain type='kvm'><name>x</name><bogus/></domain>".into())
            .await
            .unwrap_err();
        assert!(
            matches!(err, HypervisorError::Call { op: "define", .. }),
            "{err}"
        );
    }
}
