//! The API over HTTPS: with a certificate every node issues itself from the cluster CA, and
//! with an operator's certificate; what `admin-openrc` tells clients, and what a client that
//! does not trust the certificate, or speaks plain HTTP, gets.

mod common;

use std::path::Path;
use std::process::Command;

use common::osc::{openstack_bin, Osc};
use common::{http_client, openrc_var, Cluster, SHOAL};
use serde_json::{json, Value};

fn password_body(c: &Cluster) -> Value {
    json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": "admin", "domain": {"name": "Default"}, "password": c.password}}},
        "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}})
}

/// Every endpoint URL of the catalog in a token response.
fn catalog_urls(token: &Value) -> Vec<String> {
    token["token"]["catalog"]
        .as_array()
        .unwrap_or_else(|| panic!("no catalog: {token}"))
        .iter()
        .flat_map(|s| s["endpoints"].as_array().unwrap().iter())
        .map(|e| e["url"].as_str().unwrap().to_owned())
        .collect()
}

/// `shoal` as a client, with `env` as its whole `OS_*` environment.
fn shoal_cli(env: &[(String, String)], args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(SHOAL);
    for (k, _) in std::env::vars() {
        if k.starts_with("OS_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.envs(env.iter().cloned()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With `--api-tls cluster-ca` on every node: `admin-openrc` gives an `https://` URL and the
/// cluster CA as `OS_CACERT`; the real client issues tokens and lists flavors on a node that
/// joined (its certificate comes from the same CA); the catalog lists `https://` endpoints; the
/// `shoal` CLI works with `OS_CACERT` and fails without it; plain HTTP to the port and a client
/// that does not trust the CA are refused.
#[test]
fn cluster_ca_certificates_serve_https() {
    let c = Cluster::start(3, &["--api-tls", "cluster-ca"]);
    let openrc = std::fs::read_to_string(c.nodes[0].dir.join("admin-openrc")).unwrap();
    assert_eq!(
        openrc_var(&openrc, "OS_AUTH_URL").unwrap(),
        format!("https://{}/identity/v3", c.nodes[0].api)
    );
    let cacert = openrc_var(&openrc, "OS_CACERT").unwrap();
    assert!(Path::new(&cacert).is_absolute(), "{cacert}");
    assert_eq!(
        Path::new(&cacert),
        c.nodes[0].dir.join("tls/ca.pem").as_path()
    );
    for n in &c.nodes {
        assert!(
            n.dir.join("tls/api.pem").is_file(),
            "{} has no api.pem",
            n.name
        );
    }

    // Through the trusting client: tokens on every node, https endpoints in the catalog.
    for i in 0..3 {
        let resp = c
            .http
            .post(format!("{}/identity/v3/auth/tokens", c.nodes[i].base()))
            .json(&password_body(&c))
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        let urls = catalog_urls(&resp.json().unwrap());
        assert!(!urls.is_empty());
        let own = format!("https://{}/", c.nodes[i].api);
        assert!(urls.iter().all(|u| u.starts_with(&own)), "{urls:?}");
    }

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = c
        .http
        .post(format!("http://{}/identity/v3/auth/tokens", c.nodes[1].api))
        .json(&password_body(&c))
        .send();
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // A client that does not trust the cluster CA is refused at the handshake.
    let stranger = http_client(None)
        .post(format!("{}/identity/v3/auth/tokens", c.nodes[1].base()))
        .json(&password_body(&c))
        .send()
        .unwrap_err();
    let why = format!("{:?}", stranger);
    assert!(why.contains("UnknownIssuer"), "{why}");

    // The shoal CLI honours OS_CACERT.
    let env = c.openrc_env(2);
    let (ok, err) = shoal_cli(&env, &["status"]);
    assert!(ok, "shoal status over https: {err}");
    let no_ca: Vec<_> = env.into_iter().filter(|(k, _)| k != "OS_CACERT").collect();
    let (ok, err) = shoal_cli(&no_ca, &["token", "list"]);
    assert!(!ok, "shoal trusted a certificate it has no CA for");
    assert!(err.contains("certificate"), "{err}");

    let Some(bin) = openstack_bin() else { return };
    let osc = Osc { bin, cluster: &c };
    let tok = osc.json(2, &["token", "issue"]);
    assert!(tok["id"].is_string(), "{tok}");
    let created = osc.run(
        1,
        &["flavor", "create", "--ram", "64", "--vcpus", "1", "tiny"],
    );
    assert!(created.ok, "{}", created.stderr);
    let flavors = osc.json(2, &["flavor", "list"]);
    assert_eq!(flavors[0]["Name"], "tiny", "{flavors}");
    let untrusting = osc.run_as(0, &[("OS_CACERT", "")], &["token", "issue"]);
    assert!(!untrusting.ok, "the client trusted an unknown CA");
    assert!(
        untrusting.stderr.contains("CERTIFICATE_VERIFY_FAILED"),
        "{}",
        untrusting.stderr
    );
}

/// An operator's CA and a certificate for 127.0.0.1 signed by it, written to `dir`; returns
/// the paths of (CA, certificate, key) and a key that belongs to another certificate.
fn operator_pki(dir: &Path) -> [std::path::PathBuf; 4] {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    // Python's ssl verifies strictly (X509_STRICT): distinct names, key usages and an
    // authority key identifier, as a real CA's certificates have.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "operator test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "shoal api");
    leaf_params.use_authority_key_identifier_extension = true;
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let paths = ["ca.pem", "api.pem", "api.key", "other.key"].map(|f| dir.join(f));
    std::fs::write(&paths[0], ca_cert.pem()).unwrap();
    std::fs::write(&paths[1], leaf.pem()).unwrap();
    std::fs::write(&paths[2], leaf_key.serialize_pem()).unwrap();
    std::fs::write(&paths[3], KeyPair::generate().unwrap().serialize_pem()).unwrap();
    paths
}

/// With `--api-tls file`: the node serves the operator's certificate, `admin-openrc` names the
/// operator's CA, and the real client works with it. A key that does not match the
/// certificate, or a file that is missing, stops `init` before it creates anything, with a
/// message that names the file.
#[test]
fn operator_certificate_is_served_and_checked() {
    let pki = tempfile::tempdir().unwrap();
    let [ca, cert, key, other_key] = operator_pki(pki.path());

    let refused = |args: &[&str]| {
        let dir = pki.path().join("refused");
        let out = Command::new(SHOAL)
            .args(["init", "--data-dir", dir.to_str().unwrap(), "--name", "n1"])
            .args(["--listen", "127.0.0.1:1", "--api", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(!dir.join("node.toml").exists(), "init went ahead");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (ca_s, cert_s, key_s) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let err = refused(&[
        "--api-tls",
        "file",
        "--api-cert",
        cert_s,
        "--api-key",
        other_key.to_str().unwrap(),
    ]);
    assert!(
        err.contains(&format!(
            "the private key {} does not belong to the certificate {cert_s}",
            other_key.display()
        )),
        "{err}"
    );
    let missing = pki.path().join("missing.pem");
    let err = refused(&[
        "--api-tls",
        "file",
        "--api-cert",
        missing.to_str().unwrap(),
        "--api-key",
        key_s,
    ]);
    assert!(
        err.contains(&format!(
            "cannot read the API certificate {}",
            missing.display()
        )),
        "{err}"
    );
    let err = refused(&["--api-tls", "file", "--api-key", key_s]);
    assert!(err.contains("needs api_tls.cert"), "{err}");

    let c = Cluster::init(&[
        "--api-tls",
        "file",
        "--api-cert",
        cert_s,
        "--api-key",
        key_s,
        "--api-cacert",
        ca_s,
    ]);
    let openrc = std::fs::read_to_string(c.nodes[0].dir.join("admin-openrc")).unwrap();
    assert_eq!(openrc_var(&openrc, "OS_CACERT").as_deref(), Some(ca_s));
    assert!(openrc_var(&openrc, "OS_AUTH_URL")
        .unwrap()
        .starts_with("https://127.0.0.1:"));
    // The harness's client trusts only the operator's CA (from OS_CACERT), so a token means
    // the operator's certificate was served.
    c.token(0);
    let (ok, err) = shoal_cli(&c.openrc_env(0), &["status"]);
    assert!(ok, "{err}");

    let Some(bin) = openstack_bin() else { return };
    let osc = Osc { bin, cluster: &c };
    assert!(osc.json(0, &["token", "issue"])["id"].is_string());
}
