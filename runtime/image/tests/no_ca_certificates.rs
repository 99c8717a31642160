//! A host without CA certificates: a pull fails with an error that names the cause instead of
//! panicking (`reqwest::Client::new()`, which oci-client's `Client::new` falls back to, panics
//! when no root certificate loads; the pull builds its clients fallibly). Its own test binary: it changes the process environment.

use podvisor_image::{Error, ImageStore, ImageStoreConfig};

#[tokio::test]
async fn a_pull_without_ca_certificates_is_an_error_not_a_panic() {
    // rustls-native-certs reads only these when they are set.
    // Set before anything in this single-test binary reads the environment.
    std::env::set_var("SSL_CERT_FILE", "/nonexistent/podvisor-no-certs.pem");
    std::env::set_var("SSL_CERT_DIR", "/nonexistent/podvisor-no-certs");
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), ImageStoreConfig::default()).unwrap();
    match store.pull("127.0.0.1:9/busybox:latest", None).await {
        Err(Error::HttpClient { host, message }) => {
            assert_eq!(host, "127.0.0.1:9");
            assert!(!message.is_empty());
        }
        // Where the TLS stack does not need system roots to build a client, the pull gets as
        // far as the (closed) port instead; what matters is that it did not panic.
        Err(Error::RegistryUnreachable { .. }) => {}
        other => panic!("unexpected result: {other:?}"),
    }
}
