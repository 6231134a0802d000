//! The CLI's client side: authenticate with the `OS_*` variables, as the `openstack` client
//! does, and call the node that `OS_AUTH_URL` points at.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde_json::{json, Value};

/// Credentials from the environment (what `admin-openrc` exports).
#[derive(Debug, Clone)]
pub struct OpenRc {
    pub auth_url: String,
    pub username: String,
    pub password: String,
    pub project_name: String,
    pub user_domain: String,
    pub project_domain: String,
    /// CA bundle to trust for an HTTPS `auth_url` (`OS_CACERT`), besides the public roots.
    pub cacert: Option<PathBuf>,
}

impl OpenRc {
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |name: &str| {
            std::env::var(name).with_context(|| {
                format!("{name} is not set; source the admin-openrc file of a node first")
            })
        };
        Ok(Self {
            auth_url: var("OS_AUTH_URL")?,
            username: var("OS_USERNAME")?,
            password: var("OS_PASSWORD")?,
            project_name: var("OS_PROJECT_NAME")?,
            user_domain: std::env::var("OS_USER_DOMAIN_NAME").unwrap_or_else(|_| "Default".into()),
            project_domain: std::env::var("OS_PROJECT_DOMAIN_NAME")
                .unwrap_or_else(|_| "Default".into()),
            cacert: std::env::var_os("OS_CACERT")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        })
    }

    /// The node's API base URL: `OS_AUTH_URL` without its `/identity[/v3]` suffix.
    pub fn api_base(&self) -> String {
        let url = self.auth_url.trim_end_matches('/');
        let url = url.strip_suffix("/v3").unwrap_or(url);
        url.strip_suffix("/identity").unwrap_or(url).to_owned()
    }

    /// The identity URL with `/v3`.
    fn identity_v3(&self) -> String {
        format!("{}/identity/v3", self.api_base())
    }
}

/// An HTTP client that also trusts the certificates in `cacert` (PEM), as the `openstack`
/// client does with `OS_CACERT`. `timeout` bounds whole requests; streams go without.
pub fn http_client(
    cacert: Option<&Path>,
    timeout: Option<Duration>,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder();
    if let Some(path) = cacert {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read OS_CACERT {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
            format!(
                "OS_CACERT {} is not a PEM certificate bundle",
                path.display()
            )
        })?;
        if certs.is_empty() {
            bail!("OS_CACERT {} holds no certificate", path.display());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(t) = timeout {
        builder = builder.timeout(t);
    }
    Ok(builder.build()?)
}

/// An authenticated session with one node.
#[derive(Debug, Clone)]
pub struct Session {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
    pub cacert: Option<PathBuf>,
}

impl Session {
    pub async fn login(rc: &OpenRc) -> anyhow::Result<Self> {
        let http = http_client(rc.cacert.as_deref(), Some(Duration::from_secs(30)))?;
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": rc.username, "domain": {"name": rc.user_domain}, "password": rc.password}}},
            "scope": {"project": {"name": rc.project_name, "domain": {"name": rc.project_domain}}}
        }});
        let url = format!("{}/auth/tokens", rc.identity_v3());
        let resp = http
            .post(&url)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            bail!(
                "authentication at {url} failed: {} ({status})",
                error_message(resp).await
            );
        }
        let token = resp
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| anyhow!("the identity service returned no X-Subject-Token"))?
            .to_owned();
        Ok(Self {
            http,
            base: rc.api_base(),
            token,
            cacert: rc.cacert.clone(),
        })
    }

    pub async fn from_env() -> anyhow::Result<Self> {
        Self::login(&OpenRc::from_env()?).await
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .header("X-Auth-Token", &self.token)
    }

    /// A request whose response is a long-lived stream (watch events, pull progress): sent
    /// through a client without the whole-request timeout.
    pub fn stream_request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        Ok(http_client(self.cacert.as_deref(), None)?
            .request(method, format!("{}{}", self.base, path))
            .header("X-Auth-Token", &self.token))
    }

    /// Sends and returns the successful response, or the API's error message.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req.send().await.context("request failed")?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            let status = resp.status();
            bail!("{} ({status})", error_message(resp).await)
        }
    }
}

/// The message of an OpenStack error body, or the raw body.
pub async fn error_message(resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => v
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|inner| inner.get("message"))
            .and_then(|m| m.as_str())
            .map(str::to_owned)
            .unwrap_or(text),
        Err(_) => text,
    }
}

pub async fn status(as_json: bool) -> anyhow::Result<()> {
    let s = Session::from_env().await?;
    let v: Value = s
        .send(s.request(reqwest::Method::GET, "/shoal/v1/status"))
        .await?
        .json()
        .await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "leader: {}   term: {}",
        v["leader"].as_str().unwrap_or("(none)"),
        v["term"]
    );
    println!(
        "{:<16} {:<8} {:<22} {:<22} {:>10} HEALTHY",
        "NAME", "ROLE", "API", "PEER", "APPLIED"
    );
    for m in v["members"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<8} {:<22} {:<22} {:>10} {}",
            m["name"].as_str().unwrap_or(""),
            m["role"].as_str().unwrap_or(""),
            m["api"].as_str().unwrap_or(""),
            m["raft_addr"].as_str().unwrap_or(""),
            m["applied_index"].as_u64().unwrap_or(0),
            m["healthy"].as_bool().unwrap_or(false)
        );
    }
    Ok(())
}

pub async fn token_create(
    ttl_secs: Option<u64>,
    description: Option<String>,
    uses: Option<u32>,
) -> anyhow::Result<()> {
    let s = Session::from_env().await?;
    let mut body = json!({});
    if let Some(u) = uses {
        body["uses"] = json!(u);
    }
    if let Some(t) = ttl_secs {
        body["ttl_secs"] = json!(t);
    }
    if let Some(d) = description {
        body["description"] = json!(d);
    }
    let v: Value = s
        .send(
            s.request(reqwest::Method::POST, "/shoal/v1/join-tokens")
                .json(&body),
        )
        .await?
        .json()
        .await?;
    println!("id: {}", v["id"].as_str().unwrap_or(""));
    println!("expires_at: {}", v["expires_at"]);
    println!("uses: {}", v["uses"]);
    println!("{}", v["token"].as_str().unwrap_or(""));
    Ok(())
}

pub async fn token_list(as_json: bool) -> anyhow::Result<()> {
    let s = Session::from_env().await?;
    let v: Value = s
        .send(s.request(reqwest::Method::GET, "/shoal/v1/join-tokens"))
        .await?
        .json()
        .await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v["join_tokens"])?);
        return Ok(());
    }
    println!(
        "{:<18} {:<12} {:<24} {:<6} {:<24} DESCRIPTION",
        "ID", "CREATED_BY", "EXPIRES_AT", "USES", "USED_BY"
    );
    for t in v["join_tokens"].as_array().into_iter().flatten() {
        let used_by: Vec<&str> = t["used_by"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u["node"].as_str())
            .collect();
        println!(
            "{:<18} {:<12} {:<24} {:<6} {:<24} {}",
            t["id"].as_str().unwrap_or(""),
            t["created_by"].as_str().unwrap_or(""),
            t["expires_at"],
            format!("{}/{}", used_by.len(), t["uses"]),
            if used_by.is_empty() {
                "-".to_owned()
            } else {
                used_by.join(",")
            },
            t["description"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn token_revoke(id: &str) -> anyhow::Result<()> {
    let s = Session::from_env().await?;
    s.send(s.request(
        reqwest::Method::DELETE,
        &format!("/shoal/v1/join-tokens/{id}"),
    ))
    .await?;
    println!("revoked {id}");
    Ok(())
}

pub async fn node_remove(name: &str) -> anyhow::Result<()> {
    let s = Session::from_env().await?;
    s.send(s.request(reqwest::Method::DELETE, &format!("/shoal/v1/nodes/{name}")))
        .await?;
    println!("removed {name}");
    Ok(())
}

/// `s` as one URL path segment: everything but unreserved characters percent-escaped.
fn escape_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn kv_path(key: &str) -> String {
    // Keys may hold '/'; escape everything else that is not URL-safe.
    let escaped: String = key
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("/shoal/v1/kv/{escaped}")
}

/// Writes a key. The write carries a fresh `Idempotency-Key`, so when its fate is unknown (no
/// answer, 503 unavailable, 504 commit status unknown) it is sent again with the same key: the
/// cluster applies it at most once and answers a repeat with the first revision.
pub async fn kv_put(key: &str, value: &str) -> anyhow::Result<()> {
    const ATTEMPTS: u32 = 4;
    let s = Session::from_env().await?;
    let idempotency_key = uuid::Uuid::new_v4().simple().to_string();
    let mut attempt = 0;
    let resp = loop {
        attempt += 1;
        let sent = s
            .request(reqwest::Method::PUT, &kv_path(key))
            .header("Idempotency-Key", &idempotency_key)
            .body(value.to_owned())
            .send()
            .await;
        let retry = match &sent {
            Ok(r) => matches!(r.status().as_u16(), 503 | 504),
            Err(e) => e.is_connect() || e.is_timeout(),
        };
        if !retry || attempt == ATTEMPTS {
            break sent.context("request failed")?;
        }
        tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
    };
    if !resp.status().is_success() {
        let status = resp.status();
        bail!("{} ({status})", error_message(resp).await);
    }
    let v: Value = resp.json().await?;
    eprintln!("revision {}", v["revision"]);
    Ok(())
}

pub async fn kv_get(key: &str, local: bool) -> anyhow::Result<()> {
    let s = Session::from_env().await?;
    let consistency = if local { "local" } else { "linearizable" };
    let bytes = s
        .send(
            s.request(reqwest::Method::GET, &kv_path(key))
                .query(&[("consistency", consistency)]),
        )
        .await?
        .bytes()
        .await?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)?;
    out.write_all(b"\n")?;
    Ok(())
}

pub async fn kv_watch(prefix: &str, from_revision: Option<u64>) -> anyhow::Result<()> {
    let s = Session::from_env().await?;
    let mut q = vec![("table", "kv".to_owned()), ("prefix", prefix.to_owned())];
    if let Some(r) = from_revision {
        q.push(("from_revision", r.to_string()));
    }
    let resp = s
        .send(
            s.stream_request(reqwest::Method::GET, "/shoal/v1/watch")?
                .query(&q),
        )
        .await?;
    let mut stream = resp.bytes_stream();
    use std::io::Write;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("watch stream broke")?;
        let mut out = std::io::stdout().lock();
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}

/// `shoal image pull ID`: asks the node to pull the image into its cache and follows the
/// progress lines it streams.
pub async fn image_pull(id: &str, quiet: bool) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let s = Session::from_env().await?;
    let path = format!("/shoal/v1/images/{}/pull", escape_segment(id));
    let resp = s
        .send(s.stream_request(reqwest::Method::POST, &path)?)
        .await?;
    let bar = !quiet && std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut last: Option<Value> = None;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("the pull's progress stream broke")?);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let v: Value = serde_json::from_slice(&line).context("bad progress line")?;
            if bar {
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r{}", progress_line(&v, started.elapsed()));
                let _ = err.flush();
            }
            last = Some(v);
        }
    }
    if bar {
        eprintln!();
    }
    let last = last.context("the node sent no progress")?;
    match last["status"].as_str() {
        Some("done") => {
            let secs = started.elapsed().as_secs_f64();
            let total = last["total_bytes"].as_u64().unwrap_or(0);
            println!(
                "{id}: {} in {secs:.1} s ({}/s, {} from peers, {} retried chunks) at {}",
                human_bytes(total),
                human_bytes((total as f64 / secs.max(1e-3)) as u64),
                human_bytes(last["fetched_bytes"].as_u64().unwrap_or(0)),
                last["retried_chunks"].as_u64().unwrap_or(0),
                last["path"].as_str().unwrap_or("?"),
            );
            Ok(())
        }
        Some("error") => bail!(
            "pulling {id} failed: {}",
            last["message"].as_str().unwrap_or("unknown error")
        ),
        _ => bail!("the node stopped reporting before the pull of {id} ended"),
    }
}

/// Bytes in binary units, as `1.5 GiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// One progress bar line: bar, percentage, bytes, rate and ETA.
fn progress_line(v: &Value, elapsed: std::time::Duration) -> String {
    let done = v["done_bytes"].as_u64().unwrap_or(0);
    let total = v["total_bytes"].as_u64().unwrap_or(0);
    let frac = if total == 0 {
        0.0
    } else {
        done as f64 / total as f64
    };
    const WIDTH: usize = 30;
    let filled = ((frac * WIDTH as f64) as usize).min(WIDTH);
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = done as f64 / secs;
    let eta = if rate > 0.0 && total >= done {
        let left = ((total - done) as f64 / rate) as u64;
        format!("{}:{:02}", left / 60, left % 60)
    } else {
        "--:--".into()
    };
    format!(
        "[{}{}] {:>3.0}% {} / {}  {}/s  ETA {eta}   ",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled),
        frac * 100.0,
        human_bytes(done),
        human_bytes(total),
        human_bytes(rate as u64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_shows_rate_and_eta() {
        let v = serde_json::json!({"done_bytes": 512u64 << 20, "total_bytes": 1u64 << 30});
        let line = progress_line(&v, std::time::Duration::from_secs(2));
        assert!(line.contains(" 50%"), "{line}");
        assert!(line.contains("512.0 MiB / 1.0 GiB"), "{line}");
        assert!(line.contains("256.0 MiB/s"), "{line}");
        assert!(line.contains("ETA 0:02"), "{line}");
        assert_eq!(human_bytes(1023), "1023 B");
    }

    #[test]
    fn api_base_strips_identity_suffixes() {
        let mut rc = OpenRc {
            auth_url: "http://127.0.0.1:8774/identity/v3".into(),
            username: String::new(),
            password: String::new(),
            project_name: String::new(),
            user_domain: String::new(),
            project_domain: String::new(),
            cacert: None,
        };
        assert_eq!(rc.api_base(), "http://127.0.0.1:8774");
        rc.auth_url = "http://h:1/identity/".into();
        assert_eq!(rc.api_base(), "http://h:1");
    }

    /// `OS_CACERT` that cannot be used is named in the error rather than ignored.
    #[test]
    fn unusable_cacert_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = format!("{:#}", http_client(Some(&missing), None).unwrap_err());
        assert!(err.starts_with("cannot read OS_CACERT "), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = format!("{:#}", http_client(Some(&empty), None).unwrap_err());
        assert!(err.contains("holds no certificate"), "{err}");
    }

    #[test]
    fn kv_paths_escape_specials() {
        assert_eq!(kv_path("a/b c"), "/shoal/v1/kv/a/b%20c");
    }
}
