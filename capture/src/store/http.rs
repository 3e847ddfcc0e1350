//! The HTTP/1.1 client of the stores that speak a plain HTTP API (CloudShark, Google Cloud
//! Storage): one exchange on a connection of its own, in the clear or over TLS.

use std::sync::Arc;

use bytes::Bytes;

/// One HTTP/1.1 exchange on `io`: the answer with its whole body.
pub(crate) async fn send<I>(
    io: I,
    request: hyper::Request<http_body_util::Full<Bytes>>,
) -> Result<hyper::Response<Bytes>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use http_body_util::BodyExt as _;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(connection);
    let result = async {
        let (head, body) = sender.send_request(request).await?.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(hyper::Response::from_parts(head, body))
    }
    .await;
    driver.abort();
    result
}

/// The TLS client: the system's CA certificates, aws-lc-rs.
pub(crate) fn tls_connector() -> std::io::Result<tokio_rustls::TlsConnector> {
    use tokio_rustls::rustls;
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            return Err("no CA certificate found on this system".to_owned());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| e.to_string())
    });
    match config {
        Ok(config) => Ok(tokio_rustls::TlsConnector::from(config.clone())),
        Err(e) => Err(std::io::Error::other(e.clone())),
    }
}
