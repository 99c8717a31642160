//! End-to-end: registry mirrors configured in `[images.registries."<host>"]`, pulled through
//! the daemon's CRI socket from real `docker-registry` instances (plain HTTP, HTTPS with a CA
//! made by `openssl`, HTTPS requiring a client certificate, basic auth). Upstreams under
//! `.invalid` resolve nowhere.

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{e2e_can_run, TestDaemon};
use podvisor_e2e::registry::{make_client_certificate, token_auth_tests_can_run, TestRegistry};

async fn pull(
    daemon: &TestDaemon,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> tonic::Result<String> {
    let mut images = daemon.images().await.unwrap();
    let request = cri::PullImageRequest {
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        auth,
        ..Default::default()
    };
    Ok(images.pull_image(request).await?.into_inner().image_ref)
}

async fn status(daemon: &TestDaemon, image: &str) -> Option<cri::Image> {
    let mut images = daemon.images().await.unwrap();
    let request = cri::ImageStatusRequest {
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        verbose: false,
    };
    images.image_status(request).await.unwrap().into_inner().image
}

fn can_run() -> bool {
    // The TLS registry's CA comes from the openssl CLI.
    e2e_can_run() && token_auth_tests_can_run()
}

/// The upstream resolves nowhere; the plain HTTP mirror serves the image, which keeps its
/// requested name (tag and repo digest). Then a TLS mirror trusted through its own CA file,
/// with a repository prefix; without the CA file the same mirror is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_go_through_mirrors_and_keep_the_requested_name() {
    if !can_run() {
        return;
    }
    let plain = TestRegistry::start().unwrap();
    let pushed = plain.push_busybox("e2e/busybox:1").unwrap();
    let tls = TestRegistry::start_with_tls().unwrap();
    tls.push_busybox("proxy/k8s/e2e/busybox:2").unwrap();
    let ca = tls.ca_file().unwrap();
    let config = format!(
        "[images.registries.\"unreachable.invalid\"]\n\
         mirrors = [{{ url = \"http://{plain}\" }}]\n\
         [images.registries.\"tls.invalid\"]\n\
         mirrors = [{{ url = \"https://{tls}/proxy/k8s\", ca_file = {ca:?} }}]\n\
         [images.registries.\"untrusted.invalid\"]\n\
         mirrors = [{{ url = \"https://{tls}/proxy/k8s\" }}]\n\
         fallback_to_upstream = false\n",
        plain = plain.host(),
        tls = tls.host(),
    );
    let daemon = TestDaemon::start(&config).await.unwrap();

    let name = "unreachable.invalid/e2e/busybox:1";
    let id =
        pull(&daemon, name, None).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    let image = status(&daemon, name).await.expect("listed under the requested name");
    assert_eq!(image.id, id);
    assert_eq!(image.repo_tags, vec![name.to_owned()]);
    let digest = plain.manifest_digest(&pushed).unwrap();
    assert_eq!(image.repo_digests, vec![format!("unreachable.invalid/e2e/busybox@{digest}")]);
    let by_digest = format!("unreachable.invalid/e2e/busybox@{digest}");
    assert_eq!(pull(&daemon, &by_digest, None).await.unwrap(), id, "by digest too");

    let name = "tls.invalid/e2e/busybox:2";
    pull(&daemon, name, None).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    assert!(status(&daemon, name).await.is_some());
    assert!(
        daemon.log_tail().contains(&format!("from={}", tls.host())),
        "the pull names the mirror it came from:\n{}",
        daemon.log_tail()
    );

    let err = pull(&daemon, "untrusted.invalid/e2e/busybox:2", None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&tls.host()), "{}", err.message());
    assert!(err.message().to_lowercase().contains("certificate"), "{}", err.message());
}

/// A mirror that lacks the image moves on to the upstream; with the fallback off, or the
/// upstream unreachable too, the error names every endpoint tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_lacking_the_image_falls_back_to_the_upstream() {
    if !can_run() {
        return;
    }
    let mirror = TestRegistry::start().unwrap();
    mirror.push_busybox("e2e/elsewhere:1").unwrap();
    let upstream = TestRegistry::start().unwrap();
    let name = upstream.push_busybox("e2e/busybox:1").unwrap();
    let config = format!(
        "[images.registries.\"{upstream}\"]\n\
         mirrors = [{{ url = \"http://{mirror}\" }}]\n\
         [images.registries.\"nofallback.invalid\"]\n\
         mirrors = [{{ url = \"http://{mirror}\" }}]\n\
         fallback_to_upstream = false\n\
         [images.registries.\"both.invalid\"]\n\
         mirrors = [{{ url = \"http://{mirror}\" }}, {{ url = \"http://127.0.0.1:1\" }}]\n",
        upstream = upstream.host(),
        mirror = mirror.host(),
    );
    let daemon = TestDaemon::start(&config).await.unwrap();

    pull(&daemon, &name, None).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    assert_eq!(status(&daemon, &name).await.unwrap().repo_tags, vec![name.clone()]);
    let log = daemon.log_tail();
    assert!(log.contains("trying the next endpoint"), "{log}");
    assert!(log.contains(&format!("from={}", upstream.host())), "{log}");

    let err = pull(&daemon, "nofallback.invalid/e2e/busybox:1", None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains(&mirror.host()), "{}", err.message());
    assert!(!err.message().contains("upstream"), "{}", err.message());

    let err = pull(&daemon, "both.invalid/e2e/busybox:1", None).await.unwrap_err();
    let message = err.message();
    for endpoint in [
        format!("mirror http://{}", mirror.host()),
        "mirror http://127.0.0.1:1".to_owned(),
        "upstream both.invalid".to_owned(),
    ] {
        assert!(message.contains(&endpoint), "{endpoint} missing from: {message}");
    }
    // The upstream, tried last, resolves nowhere.
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

/// Credentials are those of the host contacted: the docker config's entry for the mirror,
/// never the upstream's credentials kubelet sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_gets_its_own_credentials() {
    if !can_run() {
        return;
    }
    let mirror = TestRegistry::start_with_basic_auth("mirror-user", "mirror-secret").unwrap();
    mirror.push_busybox("e2e/busybox:1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let docker_config = work.path().join("config.json");
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "mirror-user:mirror-secret",
    );
    std::fs::write(
        &docker_config,
        serde_json::json!({"auths": {(mirror.host()): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let config = format!(
        "[images]\ndocker_config = {docker_config:?}\n\
         [images.registries.\"private.invalid\"]\n\
         mirrors = [{{ url = \"http://{mirror}\" }}]\n\
         fallback_to_upstream = false\n",
        mirror = mirror.host(),
    );
    let daemon = TestDaemon::start(&config).await.unwrap();
    // kubelet's credentials are for private.invalid: not what the mirror wants, not sent.
    let upstream_auth = cri::AuthConfig {
        username: "upstream-user".into(),
        password: "upstream-secret".into(),
        ..Default::default()
    };
    let name = "private.invalid/e2e/busybox:1";
    pull(&daemon, name, Some(upstream_auth))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    assert!(status(&daemon, name).await.is_some());
}

/// A mirror that requires a client certificate (`http.tls.clientcas`) serves the pull with the
/// configured `client_cert`/`client_key`; without one, or with one from another CA, that mirror
/// fails with an error naming it and the pull falls back (or not) as configured. The upstream
/// host itself takes the same TLS settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_requiring_a_client_certificate_gets_the_configured_one() {
    if !can_run() {
        return;
    }
    let mtls = TestRegistry::start_with_client_certificates().unwrap();
    let direct = mtls.push_busybox("e2e/busybox:1").unwrap();
    let upstream = TestRegistry::start().unwrap();
    let fallback_name = upstream.push_busybox("e2e/busybox:1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let foreign = make_client_certificate(work.path(), "foreign").unwrap();
    let (ca, client) = (mtls.ca_file().unwrap(), mtls.client_certificate().unwrap());
    let config = format!(
        "[images.registries.\"mtls.invalid\"]\n\
         mirrors = [{{ url = \"https://{mtls}\", ca_file = {ca:?}, client_cert = {cert:?}, \
                       client_key = {key:?} }}]\n\
         fallback_to_upstream = false\n\
         [images.registries.\"nocert.invalid\"]\n\
         mirrors = [{{ url = \"https://{mtls}\", ca_file = {ca:?} }}]\n\
         fallback_to_upstream = false\n\
         [images.registries.\"foreign.invalid\"]\n\
         mirrors = [{{ url = \"https://{mtls}\", ca_file = {ca:?}, client_cert = {fcert:?}, \
                       client_key = {fkey:?} }}]\n\
         fallback_to_upstream = false\n\
         [images.registries.\"{upstream}\"]\n\
         mirrors = [{{ url = \"https://{mtls}\", ca_file = {ca:?}, client_cert = {fcert:?}, \
                       client_key = {fkey:?} }}]\n\
         [images.registries.\"{mtls}\"]\n\
         ca_file = {ca:?}\n\
         client_cert = {cert:?}\n\
         client_key = {key:?}\n",
        mtls = mtls.host(),
        upstream = upstream.host(),
        cert = client.cert,
        key = client.key,
        fcert = foreign.cert,
        fkey = foreign.key,
    );
    let daemon = TestDaemon::start(&config).await.unwrap();

    let name = "mtls.invalid/e2e/busybox:1";
    pull(&daemon, name, None).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    assert!(status(&daemon, name).await.is_some());
    assert!(daemon.log_tail().contains(&format!("from={}", mtls.host())), "{}", daemon.log_tail());

    // The registry's TLS alert ("received fatal alert: BadCertificate") comes through.
    for name in ["nocert.invalid/e2e/busybox:1", "foreign.invalid/e2e/busybox:1"] {
        let err = pull(&daemon, name, None).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{name}: {err:?}");
        assert!(err.message().contains(&mtls.host()), "{name}: {}", err.message());
        assert!(err.message().to_lowercase().contains("certificate"), "{name}: {}", err.message());
        assert!(status(&daemon, name).await.is_none());
    }

    // The mirror refuses the foreign certificate; the upstream serves the pull.
    pull(&daemon, &fallback_name, None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    let log = daemon.log_tail();
    assert!(log.contains("trying the next endpoint"), "{log}");
    assert!(log.contains(&format!("mirror https://{}", mtls.host())), "{log}");
    assert!(log.contains(&format!("from={}", upstream.host())), "{log}");

    // The registry's own entry: HTTPS with a client certificate, though on a loopback address.
    pull(&daemon, &direct, None).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    assert!(status(&daemon, &direct).await.is_some());
}
